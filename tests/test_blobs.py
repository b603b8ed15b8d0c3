"""The encrypted blob store's folders (a job's run sealed at each checkpoint) and where a running job keeps its
plaintext (the scratch directory)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tunesmith.security.keyring import Keyring
from tunesmith.serve import service as service_module
from tunesmith.serve.blobs import Blobs

SECRET = b"zebracornflakes"


@pytest.fixture
def blobs(tmp_path) -> Blobs:
    return Blobs(tmp_path / "blobs", Keyring.create(tmp_path / "master.key"))


def make_run(root: Path) -> dict[str, bytes]:
    files = {
        "metrics.jsonl": b'{"step": 1}\n' * 1000,
        "checkpoints/step-10/state.json": b"{}",
        "checkpoints/step-10/weights.safetensors": os.urandom(3 << 20) + SECRET,  # spans several chunks
        "reference-cache/manifest.json": SECRET,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_sealed_folder_comes_back_byte_for_byte_and_is_ciphertext_at_rest(blobs, tmp_path):
    files = make_run(tmp_path / "run")
    written = blobs.put_tree("runs/job-1", tmp_path / "run", sorted(files))
    assert written.bytes > sum(map(len, files.values()))  # the tar stream, headers included
    assert SECRET not in blobs.path("runs/job-1").read_bytes()
    names = blobs.extract_tree("runs/job-1", tmp_path / "restored")
    assert sorted(names) == sorted(files)
    assert {name: (tmp_path / "restored" / name).read_bytes() for name in files} == files


def test_a_member_vanishing_while_sealing_fails_and_keeps_the_previous_seal(blobs, tmp_path):
    files = make_run(tmp_path / "run")
    blobs.put_tree("runs/job-1", tmp_path / "run", sorted(files))
    before = blobs.path("runs/job-1").read_bytes()
    (tmp_path / "run" / "late.bin").write_bytes(b"x" * 100)
    with pytest.raises(FileNotFoundError):  # pruned by training after the listing, as happens to old checkpoints
        blobs.put_tree("runs/job-1", tmp_path / "run", [*sorted(files), "late.bin", "pruned/state.json"])
    assert blobs.path("runs/job-1").read_bytes() == before
    assert sorted(blobs.extract_tree("runs/job-1", tmp_path / "restored")) == sorted(files)


def test_unsealing_never_writes_outside_its_folder(blobs, tmp_path):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"owned"))
    blobs.put_bytes("runs/evil", archive.getvalue())
    with pytest.raises(tarfile.OutsideDestinationError):
        blobs.extract_tree("runs/evil", tmp_path / "inside")
    assert not (tmp_path / "escaped.txt").exists()


def test_the_scratch_is_on_a_memory_filesystem_with_room_else_under_the_home(tmp_path, monkeypatch):
    memory = tmp_path / "shm"
    memory.mkdir()
    monkeypatch.setattr(service_module, "MEMORY_FILESYSTEM", memory)
    home = tmp_path / "home"
    chosen = service_module.default_scratch(home)
    assert chosen.parent == memory and chosen.name.startswith(f"tunesmith-{os.getuid()}-")
    assert service_module.default_scratch(tmp_path / "other-home") != chosen  # one per service home
    monkeypatch.setattr(service_module, "MEMORY_SCRATCH_MIN_FREE", 1 << 60)  # no memory filesystem has that
    assert service_module.default_scratch(home) == home / "work"


def test_a_scratch_directory_someone_else_could_enter_is_refused(tmp_path):
    from tunesmith.errors import UserError

    mine = service_module.private_directory(tmp_path / "scratch")
    assert mine.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(UserError, match="mode 0700"):
        service_module.private_directory(shared)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(UserError, match="--scratch"):
        service_module.private_directory(tmp_path / "link")


def test_the_operator_is_told_whether_job_plaintext_is_in_memory_or_on_disk(tmp_path):
    from tunesmith.serve.service import Service, Settings

    on_disk = Service(Settings(home=tmp_path / "home", base_models={"tiny": "x"}, scratch=tmp_path / "scratch"))
    assert service_module.filesystem_type(tmp_path) not in service_module.MEMORY_FILESYSTEMS or pytest.skip(
        "this machine's temporary directory is itself in memory"
    )
    assert on_disk.describe_scratch().startswith("WARNING: job scratch on disk")
    if service_module.filesystem_type(Path("/dev/shm")) == "tmpfs":
        in_memory = Service(Settings(home=tmp_path / "home", base_models={"tiny": "x"}, scratch=Path("/dev/shm/x")))
        assert in_memory.describe_scratch() == "job scratch in memory (tmpfs): /dev/shm/x"


def test_a_seal_holds_the_run_as_of_one_checkpoint_and_skips_the_others(tmp_path):
    from tunesmith.rundir import checkpoint_steps
    from tunesmith.serve.scratch import run_members

    run = tmp_path / "run"
    for name in (
        "metrics.jsonl",
        "config.yaml",
        "reference-cache/manifest.json",
        "checkpoints/step-10/state.json",
        "checkpoints/step-20/state.json",
        "checkpoints/step-20/weights.safetensors",
        "checkpoints/.tmp-step-30/weights.safetensors",
    ):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert run_members(run, 20) == [
        "checkpoints/step-20/state.json",
        "checkpoints/step-20/weights.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "reference-cache/manifest.json",
    ]
    assert checkpoint_steps(run) == [10, 20]  # complete ones only: the one being written has no state.json yet
