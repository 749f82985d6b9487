"""Caches are optional (modules/caches.py): where the operating system refuses a cache (a read-only disk, a
folder that is not ours, a full disk), the work goes on with the cache in the user's cache folder, or
without it, and gives the result it gives with a writable cache. Outputs the user asked for still stop a
run that cannot write them: tests/test_files.py."""
import errno
import json
import os
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest

from tests.conftest import run_script
from tests.test_download import DATA, server  # noqa: F401 (the fixture)
from tests.test_files import small_tmpfs
import modules.caches
from modules.caches import cache_paths, use_compile_cache
from modules.datasets.corpus import load_tokens
from modules.datasets.sms_spam import fetch_sms_spam
from modules.download import download_file
from modules.pretrained import FILES, download_gpt2


@contextmanager
def read_only_copy(tmp_path, *files):
    """A real read-only file system (a tmpfs remounted read-only) holding copies of `files`."""
    with small_tmpfs(tmp_path / "read-only", "16m") as disk:
        for file in files:
            (disk / file.name).write_bytes(file.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        yield disk


@contextmanager
def full_disk_copy(tmp_path, *files):
    """A real tmpfs holding copies of `files` and not one byte more."""
    with small_tmpfs(tmp_path / "full", "1m") as disk:
        for file in files:
            (disk / file.name).write_bytes(file.read_bytes())
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(filler)
        yield disk


@contextmanager
def permission_denied(monkeypatch):
    """Every new file refused as a folder not ours refuses it (simulated: root may write anywhere)."""
    real_mkstemp = modules.caches.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if str(dir).startswith(str(refused_folder)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    refused_folder = None

    def deny(folder):
        nonlocal refused_folder
        refused_folder = folder
    monkeypatch.setattr("modules.files.tempfile.mkstemp", refuse)
    yield deny


FAULTS = ["read-only file system", "no space left", "permission denied"]


@contextmanager
def corpus_behind(fault, tmp_path, corpus, monkeypatch):
    if fault == "read-only file system":
        with read_only_copy(tmp_path, corpus) as disk:
            yield disk / corpus.name
    elif fault == "no space left":
        with full_disk_copy(tmp_path, corpus) as disk:
            yield disk / corpus.name
    else:
        folder = tmp_path / "not-ours"
        folder.mkdir()
        (folder / corpus.name).write_bytes(corpus.read_bytes())
        with permission_denied(monkeypatch) as deny:
            deny(folder)
            yield folder / corpus.name


@pytest.mark.parametrize("fault", FAULTS)
def test_tokens_of_a_corpus_that_cannot_be_cached_beside_it_go_to_the_user_cache(tmp_path, small_corpus, fault,
                                                                                  monkeypatch, capfd,
                                                                                  user_cache_folder):
    expected = np.array(load_tokens(small_corpus))
    with corpus_behind(fault, tmp_path, small_corpus, monkeypatch) as corpus:
        capfd.readouterr()
        assert np.array_equal(load_tokens(corpus), expected)
        note = capfd.readouterr().err
        cached = cache_paths(corpus.with_name(corpus.name + ".tokens.bin"))[1]
        assert cached.is_file() and str(cached).startswith(str(user_cache_folder))
        assert note.count("note:") == 1 and f"cached in {cached.parent} instead" in note, note
        assert not any(path.name.endswith(".tmp") for path in corpus.parent.iterdir())
        assert np.array_equal(load_tokens(corpus), expected)  # found again, not tokenized again
        assert capfd.readouterr().err.count("tokenizing") == 0


def test_tokens_go_on_in_memory_when_the_user_cache_is_refused_too(tmp_path, small_corpus, monkeypatch, capfd):
    expected = np.array(load_tokens(small_corpus))
    with read_only_copy(tmp_path, small_corpus) as disk:
        monkeypatch.setenv("XDG_CACHE_HOME", str(disk / "cache"))  # read-only too
        capfd.readouterr()
        assert np.array_equal(load_tokens(disk / small_corpus.name), expected)
        assert "going on without the cache" in capfd.readouterr().err


def test_training_on_a_read_only_corpus_gives_the_losses_of_a_writable_one(tmp_path, small_corpus, micro_config):
    def train(corpus, out):
        result = run_script("train.py", "--data", corpus, "--config", micro_config, "--out", out, "--batch-size", "4",
                            "--max-steps", "2", "--eval-batches", "1", "--sample-tokens", "0", "--seed", "1")
        return json.loads(out.with_name(out.stem + ".metrics.json").read_text()), result.stderr

    writable, _ = train(small_corpus, tmp_path / "writable.pt")
    with read_only_copy(tmp_path, small_corpus) as disk:
        read_only, stderr = train(disk / small_corpus.name, tmp_path / "read-only.pt")
    assert "Read-only file system); cached in" in stderr and "Traceback" not in stderr
    assert (read_only["train_loss"], read_only["val_loss"]) == (writable["train_loss"], writable["val_loss"])


@pytest.mark.parametrize("fault", ["read-only file system", "no space left"])
def test_a_download_into_a_folder_that_cannot_hold_it_lands_in_the_user_cache(server, tmp_path, fault, capfd,  # noqa: F811
                                                                              user_cache_folder):
    mount = read_only_copy(tmp_path) if fault == "read-only file system" else full_disk_copy(tmp_path)
    with mount as disk:
        path = download_file(f"{server.url}/data.bin", disk / "data" / "data.bin", backoff_seconds=0, progress=False)
        assert path.read_bytes() == DATA and str(path).startswith(str(user_cache_folder))
        assert f"cached in {path.parent} instead" in capfd.readouterr().err
        requests = len(server.requests)
        assert download_file(f"{server.url}/data.bin", disk / "data" / "data.bin", progress=False) == path
        assert len(server.requests) == requests  # found in the user cache, not fetched again


def test_gpt2_files_half_in_a_read_only_folder_are_gathered_in_the_user_cache(server, tmp_path):  # noqa: F811
    for name in FILES:
        server.files[f"/124M/{name}"] = name.encode() * 10
    source = tmp_path / "source"
    source.mkdir()
    (source / "hparams.json").write_bytes(b"hparams.json" * 10)
    with read_only_copy(tmp_path, source / "hparams.json") as disk:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        (disk / "models" / "124M").mkdir(parents=True)
        (disk / "hparams.json").rename(disk / "models" / "124M" / "hparams.json")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        folder = download_gpt2("124M", disk / "models", server.url, backoff_seconds=0, progress=False)
        assert folder == cache_paths(disk / "models" / "124M")[1]
        assert sorted(path.name for path in folder.iterdir()) == sorted(FILES)
        assert all((folder / name).read_bytes() == name.encode() * 10 for name in FILES)
        assert ("/124M/hparams.json", None) not in server.requests  # it was there already


def test_the_sms_data_set_extracted_where_the_data_folder_is_read_only(tmp_path, user_cache_folder):
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("SMSSpamCollection", "ham\tlunch?\nspam\twin cash\n")
    source = tmp_path / "sms_spam_collection.zip"
    source.write_bytes(archive.getvalue())
    with read_only_copy(tmp_path, source) as disk:
        path = fetch_sms_spam(disk, url="http://127.0.0.1:9/never-asked")  # the zip is there already
        assert path.read_text() == "ham\tlunch?\nspam\twin cash\n" and str(path).startswith(str(user_cache_folder))
        assert fetch_sms_spam(disk, url="http://127.0.0.1:9/never-asked") == path


def test_compiled_programs_go_where_they_can_be_written(tmp_path, monkeypatch, user_cache_folder, capfd):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with read_only_copy(tmp_path) as disk:
        monkeypatch.setattr(modules.caches, "PROJECT_FOLDER", disk)  # a project installed read-only
        assert use_compile_cache() == user_cache_folder / "torch-compile"
        assert "Read-only file system); cached in" in capfd.readouterr().err
        monkeypatch.setenv("XDG_CACHE_HOME", str(disk / "cache"))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
        assert use_compile_cache().name == "gpt2-from-scratch-torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert use_compile_cache() == tmp_path / "chosen"  # the user's choice, where it can be written


# ----------------------------------------------------------------------------- every cache, in each refusal
REFUSALS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
            errno.EACCES: "Permission denied"}


@contextmanager
def refusing(monkeypatch, error_number, *folders):
    """The operating system refuses every new file in `folders` with `error_number`, the way the project
    makes files: the atomic writer's temporary file, a download's .part, the compile cache's probe."""
    def refused(path):
        return any(str(path).startswith(str(folder)) for folder in folders)

    def refuse(path):
        raise OSError(error_number, os.strerror(error_number), str(path))

    def guard(make):
        def guarded(*args, **kwargs):
            path = kwargs.get("dir") or (args[0] if args else None)
            return refuse(path) if refused(path) else make(*args, **kwargs)
        return guarded

    import modules.download
    import modules.files
    monkeypatch.setattr(modules.files.tempfile, "mkstemp", guard(modules.files.tempfile.mkstemp))
    monkeypatch.setattr(modules.caches.tempfile, "TemporaryFile", guard(modules.caches.tempfile.TemporaryFile))
    monkeypatch.setattr(modules.download, "open", guard(open), raising=False)
    yield


def _sms_zip(folder):
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("SMSSpamCollection", "ham\tlunch?\nspam\twin cash\n")
    (folder / "sms_spam_collection.zip").write_bytes(archive.getvalue())


def _use_each_cache(folder, server_url):
    """{kind: a function that uses that cache for a file in `folder` and returns what the work gets from it}."""
    corpus = folder / "corpus.txt"
    corpus.write_text("Every effort moves you. " * 40)
    return {
        "tokens": lambda: np.array(load_tokens(corpus)).tolist(),
        "download": lambda: download_file(f"{server_url}/data.bin", folder / "data.bin", progress=False).read_bytes(),
        "extracted data set": lambda: _sms_zip(folder) or fetch_sms_spam(folder, "http://127.0.0.1:9/").read_text(),
        "compiled programs": lambda: modules.caches.PROJECT_FOLDER == folder and use_compile_cache().is_dir(),
    }


@pytest.mark.parametrize("error_number", REFUSALS)
@pytest.mark.parametrize("kind", ["tokens", "download", "extracted data set", "compiled programs"])
def test_a_refused_cache_goes_to_the_user_cache_with_the_same_result(tmp_path, monkeypatch, capfd, server,  # noqa: F811
                                                                     user_cache_folder, kind, error_number):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    writable, refused = tmp_path / "writable", tmp_path / "refused"
    writable.mkdir(), refused.mkdir()
    monkeypatch.setattr(modules.caches, "PROJECT_FOLDER", writable)
    expected = _use_each_cache(writable, server.url)[kind]()
    monkeypatch.setattr(modules.caches, "PROJECT_FOLDER", refused)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use = _use_each_cache(refused, server.url)[kind]
    capfd.readouterr()
    with refusing(monkeypatch, error_number, refused):
        assert use() == expected
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and REFUSALS[error_number] in notes[0] and str(user_cache_folder) in notes[0], notes
    assert not [path for path in refused.rglob("*") if path.name.endswith((".tmp", ".bin", ".json"))
                and path.stat().st_size]


@pytest.mark.parametrize("error_number", REFUSALS)
def test_refused_everywhere_the_tokens_are_kept_in_memory_and_needed_files_say_where_to_write(
        tmp_path, monkeypatch, capfd, server, user_cache_folder, error_number):  # noqa: F811
    use = _use_each_cache(tmp_path, server.url)
    expected_tokens = use["tokens"]()
    (tmp_path / "corpus.txt").write_text("Every effort moves you. " * 40)  # the same text, so no stale cache...
    for path in tmp_path.glob("corpus.txt.tokens.*"):
        path.unlink()  # ...and none at all
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(modules.caches, "PROJECT_FOLDER", tmp_path)
    capfd.readouterr()
    with refusing(monkeypatch, error_number, tmp_path, user_cache_folder, modules.caches.tempfile.gettempdir()):
        assert use["tokens"]() == expected_tokens
        assert "going on without the cache" in capfd.readouterr().err
        from modules.errors import UserError
        with pytest.raises(UserError, match=rf"could not write .*data.bin.part: {REFUSALS[error_number]}"):
            use["download"]()
        with pytest.raises(UserError, match=rf"could not write .*SMSSpamCollection: {REFUSALS[error_number]}"):
            use["extracted data set"]()
        assert use_compile_cache() is None and "running uncompiled" in capfd.readouterr().err
