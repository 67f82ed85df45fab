"""Resolve a data file by logical name and verify its checksum.

Order: an explicit path (``dataset.path``) > ``<data_dir>/<relative path>`` when that file exists
(the pipeline passes ``../shared/data``) > the gzip copy bundled in ``facts/bundled/`` (so the
package works with no data folder at all) > for ROME's full ``counterfact.json``, a cached or
opt-in downloaded copy. Every file with a published sha256 (``docs/data-sources.md``) is
verified; for bundled gz copies the *decompressed* bytes are verified, so all origins must yield
byte-identical content.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from core.checks import check_choice
from core.errors import CacheError, ConfigError, DataError
from core.io import atomic_path
from core.paths import existing_file, optional_dir

log = logging.getLogger(__name__)

Origin = Literal["path", "data_dir", "bundled", "cache", "download"]

PARAREL_BUNDLE = "pararel_patterns.json.gz"
PATH_HINT = "point dataset.path at the data file itself, or remove dataset.path"


@dataclass(frozen=True)
class DataFile:
    """A logical data file: where it lives under the data dir, its bundled copy and its checksum."""

    name: str
    relative_path: str
    sha256: str
    size: int
    bundled: Optional[str] = None  # file name in facts/bundled/ (gz), or "pararel:<id>"
    url: Optional[str] = None


_PARAREL_SHA = {
    "P1001": ("160413abdb74470f19ca0fc97fc54b8241b6526fb54a73dc8906fb79cbd9ee20", 119),
    "P101": ("199eb2fbdcb6c26ac81ac0d48b485521d57fa961c9902840d4f5fc937f59e94c", 1655),
    "P103": ("edb4df57360abb418ec72e96d518bd42f216ccac578bedbca6f5f769c76951fb", 494),
    "P106": ("4066382c8e5d6038024aa1c601aa53fab7c48596677ed26d71240597d42ee5c1", 1315),
    "P108": ("0fb4993970e59f5acec2af83b3bba9c54b171db201f46ad28967f79a054dc220", 473),
    "P127": ("aa5d85fe2e44b9776e6b16b7ff7ef462a85f09b33315d31106939f0e74fd7917", 396),
    "P1303": ("5918d169f43d7486459d421816a9d2cd1935c4e857f2de01ebcae7120dddb94c", 411),
    "P131": ("a0e7cd10922b61fb6b200c2c3b3a33cd0c6944446a7659b66b269a21762ecaa7", 322),
    "P136": ("677f9878d4d26a53de5d5c874fe5e28cd1a37b3ef678acac36944df4c01134ca", 662),
    "P1376": ("67c9bc7dc08bcca42ba5d5fbd11b35c0bcf41a961bba87d760e4b29f196a9bbd", 1695),
    "P138": ("a15d8689fb52c2245cb76244ac4fce40eef868c445473b94d5888586a46fc3ad", 2430),
    "P140": ("1adf3a553047050b195e9305efe0fb3bf34d913b320818a3e88c1fdd161789df", 500),
    "P1412": ("b2869ca24f313bbfd815a02259bf53c37ce39df0b11a2704f791df47b1e12b3d", 956),
    "P159": ("9679b341f4fb8ea9d48d9398bc439a8869908e485818638a4345437f9ee97002", 1269),
    "P17": ("2717b226dbca5237ec3e8e405a6464baedc5c4d7b13554204aafa76df740f711", 351),
    "P176": ("13aa5d5af04b58b16b9b6a99ba6c96dbdef7a4fae7dcceaffaa67a2ce5301401", 1313),
    "P178": ("5fbdd8e8a6dc85a686a7067bdc0d6fd35307e5c17b121ddcecdcd2da448d1313", 1770),
    "P19": ("7c6016bb80b386b8e7f8a99d5c73ea925ed2b9f29d5c0c9c252938c9533b3522", 1407),
    "P190": ("5edac1cbc8454283623b6e20304a78c53b28ce0bb998826d358a8739809077a3", 482),
    "P20": ("a209a17ecb4ccf0f67261072e97596900d9e77bdd70c3e8a99654af1039f98a4", 866),
    "P264": ("53274030ad439f0bfb85bda4390fd7f7a9868c8a3f68e151e08c91e596e7bc74", 2179),
    "P27": ("e5ce71502ec3c287749e649a1ac4640878801b3dfc49df8eea1c8fca65347f76", 1058),
    "P276": ("2ee34c4fda9d9352f6eba0d8b41b0313ce2eb24ed3cabc4ac131c9f1e9cd1fc5", 202),
    "P279": ("ff2b73df5edb13718a5f4bb2004e924ff99314e6625bd35c0ca4aab9dd7363ec", 461),
    "P30": ("69f0152df42e17dca5c3181ddf1ccca8110fba50fd4b61fe9e48c22c8e5adb93", 514),
    "P36": ("78cbc36c71073ee993b2f7194c9b216af839859cefb0186cef2c2bc89f377def", 1696),
    "P361": ("5255cd61805e25590013518aec793b2bc51d635a02a9088cf0b5788f9db4c1a8", 216),
    "P364": ("c96f42f6dde8ed78be284bfc3666056304d399e0372beb2fb629382feeb9ca3f", 738),
    "P37": ("b5c4ad242edcf9104c4fb0caa3a470ac3bc2a5cfd02f160d5b0d96969f63bfea", 1442),
    "P39": ("51de02294859454289284c781bbcd54e038842d0040e55f598ead3652035307f", 726),
    "P407": ("a87b9e7d7728de1f782013edee4567e7c5fe6242419c691f48a4177d166df532", 2083),
    "P413": ("3d1e94ada2e9f27eb99275f2e07c80d21b9a5ea677fe6fa751395ffc778ba0fe", 656),
    "P449": ("cea08d3d7df17f648d84814a7c607476f8fc4291b94976b88658f1b35cf90fb8", 1160),
    "P463": ("7973e666b4e33c05f8a8cfec6cbd0b3d09edf40bf9a7a3833e12bc3737399ce6", 658),
    "P47": ("329108ae3e0138c7af09697b1ea33e1808ccdbe8931d05c02b5334b686b229e2", 1128),
    "P495": ("3a2abf7c9ffcf1753e27efa15a915d838c472f5e52f249410d0af47cfac7d9c2", 1874),
    "P530": ("cc6193686be94ed9fe37deb765753e11c714f6f473e2b2bc171839700b31915d", 1289),
    "P740": ("dc588e68ea43ac4f9ef3942d3d3b4b0aee0c099f72001caf51036b0da54f61a7", 1481),
    "P937": ("05a2822a2d62a012ea80f6e92401b6990a5ce05fc6543a4df6b34b4b3cacc2dd", 569),
}

ROME_COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


def _catalog() -> dict[str, DataFile]:
    files = [
        DataFile("known_1000", "known_1000.json",
                 "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a", 343229, "known_1000.json.gz"),
        DataFile("counterfact_mend/edit", "counterfact_mend/counterfact-edit.json",
                 "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967", 3850773, "counterfact-edit.json.gz"),
        DataFile("counterfact_mend/train", "counterfact_mend/counterfact-train.json",
                 "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0", 3849872, "counterfact-train.json.gz"),
        DataFile("counterfact_mend/val", "counterfact_mend/counterfact-val.json",
                 "4feb68cc1f85dcf3b285252a28f2b2193ff69971947619356236953be60ecd1f", 741112, "counterfact-val.json.gz"),
        DataFile("wikitext/wikitext-2-raw/wiki.test.raw", "wikitext/wikitext-2-raw/wiki.test.raw",
                 "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c", 1290547, "wikitext-2-raw.wiki.test.raw.gz"),
        DataFile("wikitext/wikitext-2/valid.txt", "wikitext/wikitext-2/valid.txt",
                 "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1121681, "wikitext-2.valid.txt.gz"),
        DataFile("wikitext/wikitext-2/test.txt", "wikitext/wikitext-2/test.txt",
                 "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1256449, "wikitext-2.test.txt.gz"),
        DataFile("counterfact_rome", "counterfact.json",
                 "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f", 45108470, None, ROME_COUNTERFACT_URL),
    ]
    files += [
        DataFile(f"pararel/{rid}", f"pararel/graphs_json/{rid}.jsonl", sha, size, f"pararel:{rid}")
        for rid, (sha, size) in _PARAREL_SHA.items()
    ]
    return {f.name: f for f in files}


CATALOG: dict[str, DataFile] = _catalog()
PARAREL_IDS: tuple[str, ...] = tuple(_PARAREL_SHA)


@dataclass(frozen=True)
class Resolved:
    """The bytes of a logical file plus where they came from (for logs and reports)."""

    name: str
    origin: Origin
    location: str
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8")

    def json(self):
        return json.loads(self.data)


def data_file(name: str) -> DataFile:
    check_choice("data_file", name, sorted(CATALOG), "unknown logical data file")
    return CATALOG[name]


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent / "bundled"


def _bundled_bytes(spec: DataFile) -> bytes | None:
    if spec.bundled is None:
        return None
    if spec.bundled.startswith("pararel:"):
        path = bundled_dir() / PARAREL_BUNDLE
        if not path.exists():
            return None
        texts = json.loads(gzip.decompress(path.read_bytes()))
        text = texts.get(spec.bundled.split(":", 1)[1])
        return None if text is None else text.encode("utf-8")
    path = bundled_dir() / spec.bundled
    return gzip.decompress(path.read_bytes()) if path.exists() else None


def verify_bytes(spec: DataFile, data: bytes, location: str, error: type = DataError) -> None:
    """Raise (DataError by default) when the content differs from the published checksum."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise error(
            spec.name, location,
            f"sha256 {digest[:16]}... ({len(data)} bytes) differs from the published {spec.sha256[:16]}... ({spec.size} bytes)",
            "the file is corrupt or a different version; delete it or point dataset.path at the original "
            "(see facts/bundled/NOTICE.md for origins)",
        )


def resolve(
    name: str,
    path: str | Path | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
    verify: bool = True,
    fetch: Callable[[str], bytes] | None = None,
) -> Resolved:
    """Return the verified bytes of ``name`` from the first origin that has it."""
    spec = data_file(name)
    data_dir = optional_dir("paths.data_dir", data_dir)  # a file here would silently mean "use the bundle"
    candidates: list[tuple[Origin, Path]] = []
    if path is not None:
        candidates.append(("path", existing_file("dataset.path", path, DataError, PATH_HINT)))
    elif data_dir is not None and (Path(data_dir) / spec.relative_path).exists():
        candidates.append(("data_dir", Path(data_dir) / spec.relative_path))
    for origin, file in candidates:
        data = file.read_bytes()
        if verify:
            verify_bytes(spec, data, str(file))
        log.debug("%s from %s (%s)", name, file, origin)
        return Resolved(name, origin, str(file), data)
    data = _bundled_bytes(spec)
    if data is not None:
        if verify:
            verify_bytes(spec, data, f"facts/bundled/{spec.bundled}")
        return Resolved(name, "bundled", f"facts/bundled/{spec.bundled}", data)
    return _from_cache_or_download(spec, cache_dir, download, fetch)


def _from_cache_or_download(
    spec: DataFile, cache_dir: str | Path | None, download: bool, fetch: Callable[[str], bytes] | None
) -> Resolved:
    hint = f"pass dataset.path=/path/to/{Path(spec.relative_path).name}"
    if spec.url:
        hint += f", or dataset.download=true to fetch {spec.url} into the cache dir"
    if cache_dir is not None:
        cached = Path(cache_dir) / "data" / Path(spec.relative_path).name
        if cached.exists():
            data = cached.read_bytes()
            verify_bytes(spec, data, str(cached), error=CacheError)
            return Resolved(spec.name, "cache", str(cached), data)
    if not (download and spec.url):
        raise DataError(spec.name, None, "not found in dataset.path, the data dir, the bundle or the cache", hint)
    if cache_dir is None:
        raise ConfigError("cache_dir", None, "download=true needs a cache dir to store the file", "set paths.cache_dir")
    target = Path(cache_dir) / "data" / Path(spec.relative_path).name
    log.info("downloading %s (%d bytes) to %s", spec.url, spec.size, target)
    data = (fetch or _urllib_fetch)(spec.url)
    verify_bytes(spec, data, spec.url, error=CacheError)  # nothing is written unless it verifies
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Resolved(spec.name, "download", str(target), data)


def _urllib_fetch(url: str, timeout: float = 120.0) -> bytes:
    """Plain urllib GET; raises DataError with the URL on network failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (https or file URL from the catalog)
            return response.read()
    except OSError as exc:
        raise DataError("dataset.download", url, f"download failed: {exc}", "download it by hand and pass dataset.path") from exc


def pararel_patterns(data_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """ParaRel patterns per relation id (``{"pattern": "The mother tongue of [X] is [Y].", ...}``)."""
    out: dict[str, list[dict]] = {}
    for rid in PARAREL_IDS:
        text = resolve(f"pararel/{rid}", data_dir=data_dir).text()
        out[rid] = [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


WIKITEXT_FILES = ("wikitext-2-raw/wiki.test.raw", "wikitext-2/valid.txt", "wikitext-2/test.txt")


def wikitext(file: str = "wikitext-2-raw/wiki.test.raw", data_dir: str | Path | None = None) -> str:
    """The text of one WikiText-2 file (for second-moment statistics); CC BY-SA 3.0, see NOTICE.md.

    ``file`` is one of ``WIKITEXT_FILES``. The raw test split has CRLF line endings; the
    tokenized splits contain ``<unk>``: callers decide how to clean them.
    """
    check_choice("wikitext.file", file, WIKITEXT_FILES, "unknown WikiText file")
    return resolve(f"wikitext/{file}", data_dir=data_dir).text()


def wikitext_paragraphs(text: str) -> list[str]:
    """Paragraphs of a WikiText file: headings dropped, `` @-@ `` joins and ``<unk>`` removed."""
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line.replace("<unk>", ""))
        line = re.sub(r" ([,.;:!?)'])", r"\1", re.sub(r"\s+", " ", line))
        paragraphs.append(line.strip())
    return paragraphs


def identify(path: str | Path, names: tuple[str, ...]) -> Resolved:
    """Read a user-given file that must be one of the published files ``names`` (by sha256)."""
    file = existing_file("dataset.path", path, DataError, PATH_HINT)
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    for name in names:
        if data_file(name).sha256 == digest:
            return Resolved(name, "path", str(file), data)
    raise DataError(
        "dataset.path", str(path), f"sha256 {digest[:16]}... matches none of the published files {list(names)}",
        "use the unmodified published file, or put your own facts in a jsonl and use dataset=user",
    )
