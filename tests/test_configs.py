"""Every option of every config group composes; typos and wrong types fail at compose time."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from core.conf import available_options
from pipeline.config import SCHEMAS

GROUPS = ("model", "dataset", "perspective", "editor", "stage", "logger", "experiment")


def _options() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in available_options(group)]


@pytest.mark.parametrize("group,option", _options())
def test_every_group_option_composes(compose_config, group, option):
    override = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
    if group == "experiment":
        override = f"experiment={option}"
    cfg = compose_config(override)
    OmegaConf.resolve(cfg)
    if group != "experiment":
        assert cfg[group].name == option or group in ("stage",) and cfg.stage.name


def test_default_config_resolves(compose_config, tmp_path):
    cfg = compose_config()
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["model"]["name"] == "smollm2_135m"
    assert container["paths"]["output_dir"].startswith(str(tmp_path))
    assert container["force"] is False


def test_misspelled_key_fails_at_compose_time(compose_config):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config("model.dtpye=float16")


def test_wrong_type_fails_at_compose_time(compose_config):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("model.tiny_layers=many")


def test_unknown_option_lists_choices(compose_config):
    with pytest.raises(ConfigCompositionException, match="smollm2_135m"):
        compose_config("model=gpt5")


def test_job_dirs_are_deterministic(compose_config):
    cfg = compose_config("model=tiny_gpt2", "force=true", return_hydra_config=True)
    assert "${now:" not in OmegaConf.to_yaml(cfg.hydra.sweep, resolve=False)
    assert "force" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_long_override_lists_get_short_distinct_dirnames():
    from pipeline.config import MAX_DIRNAME, dirname_from_overrides

    long_a = ",".join(f"stage.trace.key{i}={i}" for i in range(40))
    long_b = long_a.replace("key39=39", "key39=40")
    a, b = dirname_from_overrides(long_a), dirname_from_overrides(long_b)
    assert len(a) <= MAX_DIRNAME and len(b) <= MAX_DIRNAME and a != b
    assert a == dirname_from_overrides(long_a), "deterministic, so a rerun finds the same job dir"
    assert dirname_from_overrides("editor=rome,perspective=entity") == "editor=rome,perspective=entity"


@pytest.mark.parametrize("group,schema", [(g, s) for g, s, _ in SCHEMAS if g in GROUPS])
def test_schema_choice_is_refused_with_the_real_options(compose_config, group, schema):
    from core.errors import ConfigError
    from pipeline.config import check_group_choices

    cfg = compose_config(f"{group}={schema}", return_hydra_config=True)
    with pytest.raises(ConfigError) as info:
        check_group_choices(dict(cfg.hydra.runtime.choices))
    assert info.value.key == group and info.value.value == schema
    assert all(option in info.value.hint for option in available_options(group))


def test_real_choices_pass_the_choice_check(compose_config):
    from pipeline.config import check_group_choices

    cfg = compose_config("editor=none", "model=tiny_gpt2", "experiment=demo", return_hydra_config=True)
    check_group_choices(dict(cfg.hydra.runtime.choices))  # editor_model=none_tiny_gpt2 is optional and absent: fine


@pytest.mark.parametrize("stage", available_options("stage"))
def test_demo_experiment_composes_with_every_stage(compose_config, stage):
    cfg = compose_config("experiment=demo", f"stage={stage}")
    OmegaConf.resolve(cfg)
    assert cfg.stage.name == stage and cfg.model.name == "smollm2_135m"


def test_demo_settings_reach_the_chosen_stage_and_both_steps_of_full(compose_config):
    assert compose_config("experiment=demo", "stage=edit").stage.n_cases == 3
    trace = compose_config("experiment=demo", "stage=trace").stage
    assert (trace.n_facts, trace.samples, trace.severed, trace.plot_facts) == (2, 3, False, 2)
    full = compose_config("experiment=demo").stage
    assert full.name == "full" and full.edit.n_cases == 3 and full.trace == trace
    plain = compose_config("stage=edit").stage  # without the experiment: the stage's own defaults
    assert plain.n_cases == 100


# The launcher class each `conf/hydra/launcher/*.yaml` must name; a new launcher file needs an entry.
LAUNCHER_TARGETS = {
    "local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "ray": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
}


def test_every_launcher_file_has_an_expected_target():
    assert sorted(LAUNCHER_TARGETS) == available_options("hydra/launcher")


@pytest.mark.parametrize("launcher", available_options("hydra/launcher"))
def test_every_launcher_option_composes(compose_config, launcher):
    """What `--cfg hydra hydra/launcher=<launcher>` prints: it composes, resolves and names its class.

    The class itself is only imported where its plugin is installed (`.[cluster]`, `.[ray]`).
    """
    import importlib.util

    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    cfg = compose_config(f"hydra/launcher={launcher}", return_hydra_config=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == launcher
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    target = launcher_cfg["_target_"]
    assert target == LAUNCHER_TARGETS[launcher]
    plugin = target.rsplit(".", 2)[0]  # hydra_plugins.<plugin package>
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed, so {target} cannot be imported here")
    assert issubclass(get_class(target), Launcher)


def test_check_choice_names_key_value_and_the_choices():
    from core.checks import check_choice
    from core.errors import ConfigError, ModelError

    assert check_choice("editor.rewrites", "all", ("main", "all")) == "all"
    with pytest.raises(ConfigError) as info:
        check_choice("editor.rewrites", "some", ("main", "all"))
    assert (info.value.key, info.value.value, info.value.problem) == ("editor.rewrites", "some", "unknown choice")
    assert info.value.hint == "use one of main, all"
    with pytest.raises(ModelError, match="needs a mask"):
        check_choice("model.attn_implementation", "flash", ["eager"], "needs a mask", error=ModelError)


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_relation_removal_is_the_authors_on_paper_experiments_only(compose_config, editor):
    """The RaKE removal loss (tok("None"), no space) on the paper models; " None" elsewhere; a typo is refused."""
    from core.errors import ConfigError

    for experiment in ("paper_gpt2_xl", "paper_gpt_j"):
        assert compose_config(f"experiment={experiment}", f"editor={editor}").editor.relation_removal == "authors"
    assert compose_config(f"editor={editor}", "model=tiny_gpt2").editor.relation_removal == "spaced"
    with pytest.raises(ConfigError, match="relation_removal"):  # when the stage converts the config
        OmegaConf.to_object(compose_config(f"editor={editor}", "model=tiny_gpt2", "editor.relation_removal=nospace").editor)


ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, code: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "pipeline.run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_registering_the_schemas_imports_neither_torch_nor_transformers():
    """The schemas live in torch-free config modules, so `--cfg job` and `--help` start in well under a second."""
    done = _cli(code="import sys, pipeline.config; pipeline.config.register_configs(); import pipeline.run; "
                     "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cfg_job_prints_the_composed_config():
    import time

    started = time.perf_counter()
    done = _cli("--cfg", "job", "editor=rome", "model=tiny_gpt2")
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    printed = OmegaConf.create(done.stdout)
    assert printed.editor.name == "rome" and printed.model.name == "tiny_gpt2" and printed.stage.name
    assert seconds < 30, f"--cfg job took {seconds:.1f} s"  # ~0.5 s without torch; generous for a loaded CI box


def test_help_lists_the_yaml_options_and_hides_the_schemas():
    done = _cli("--help")
    assert done.returncode == 0, done.stderr
    assert "_schema" not in done.stdout  # registered in the ConfigStore, but never a user's choice
    for group in ("editor", "model", "stage", "experiment/stage"):
        assert f"{group}: {', '.join(available_options(group))}\n" in done.stdout


def _restated_defaults(node: dict, schema: dict, prefix: str = "") -> list[str]:
    """Keys of a yaml ``node`` whose value equals the schema's own default there (a second place for it)."""
    restated = []
    for key, value in node.items():
        default = schema.get(key, "???")
        if key == "defaults" or default == "???":  # not in the schema, or required (its value lives in the yaml)
            continue
        if isinstance(value, dict) and isinstance(default, dict):
            restated += _restated_defaults(value, default, f"{prefix}{key}.")
        elif value == default:
            restated.append(f"{prefix}{key}: {value}")
    return restated


@pytest.mark.parametrize("group,option", [(g, o) for g in ("stage", "perspective") for o in available_options(g)])
def test_option_yamls_do_not_restate_schema_defaults(group, option):
    """Each default lives in one place: the schema dataclass. A group option yaml lists only what differs."""
    raw = OmegaConf.load(Path(__file__).parents[1] / "conf" / group / f"{option}.yaml")
    schema_name = next(d for d in raw.defaults if isinstance(d, str) and d.endswith("_schema"))
    spec = next(spec for g, name, spec in SCHEMAS if g == group and name == schema_name)
    module, cls = spec.split(":")
    schema = OmegaConf.to_container(OmegaConf.structured(getattr(importlib.import_module(module), cls)))
    assert _restated_defaults(OmegaConf.to_container(raw), schema) == [], f"conf/{group}/{option}.yaml restates {spec}'s defaults"


def test_trace_stage_defaults_are_the_trace_settings():
    """What a trace computes defaults to tracing.TraceSettings in both the library and the trace stage."""
    from pipeline.stages.config import TraceStageConfig
    from tracing.settings import TraceSettings

    library, stage = TraceSettings(), TraceStageConfig().trace_settings(seed=0)
    for key in ("kinds", "window", "samples", "noise", "noise_factor", "noise_scale"):
        assert getattr(stage, key) == getattr(library, key), key
