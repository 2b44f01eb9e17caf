"""The Cloud TPU scripts: their --dry-run output is the exact gcloud commands we expect."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_setup"
COMMON = ["--project", "proj", "--zone", "us-central2-b", "--name", "llm", "--dry-run"]


def dry_run(script: str, *args: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), *COMMON, *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_one_slice(accelerator, runtime):
    assert dry_run("create.sh", "--type", accelerator) == [
        f"gcloud compute tpus tpu-vm create llm --project=proj --zone=us-central2-b "
        f"--accelerator-type={accelerator} --version={runtime}"
    ]


def test_create_multislice_spot_uses_queued_resources():
    assert dry_run("create.sh", "--type", "v5litepod-256", "--nodes", "2", "--spot") == [
        "gcloud compute tpus queued-resources create llm --project=proj --zone=us-central2-b "
        "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite "
        "--node-count=2 --node-prefix=llm --spot"
    ]


@pytest.mark.parametrize("accelerator, devices", [("v4-8", 4), ("v5p-128", 64), ("v5litepod-8", 8)])
def test_setup_checks_the_device_count_of_the_slice(accelerator, devices):
    """The checkout goes as one archive, without .git, .venv and runs, replacing the last
    copy (scp -r into an existing directory would nest it); jaxllm goes into a venv of
    Python 3.11 or newer (the TPU images' python3 is 3.10); the check initialises as jaxllm
    does."""
    tar, scp, install, check = dry_run("setup.sh", "--type", accelerator)
    assert tar.startswith("tar -czf ") and "--exclude=.git --exclude=.venv --exclude=runs" in tar
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "~/jaxllm.tar.gz" in scp
    assert "rm -rf ~/jaxllm && mkdir ~/jaxllm && tar -xzf ~/jaxllm.tar.gz" in install
    assert "python3.11" in install and "sys.version_info < (3, 11)" in install
    assert "~/jaxllm-venv/bin/pip install -q -e ~/jaxllm" in install and "jax[tpu]" in install
    assert "~/jaxllm-venv/bin/python -c" in check and "distributed.initialize()" in check
    assert f"assert n == {devices}" in check


def test_the_install_command_picks_a_python_of_3_11_or_newer(tmp_path):
    """The remote shell snippet run here, with python3 faked as 3.10 and as the real one."""
    install = dry_run("setup.sh", "--type", "v4-8")[2]
    snippet = re.search(r"(\{ python3 -c .*; \}; \})", install).group(1).replace("'\\''", "'")
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")  # sys.version_info < (3, 11)
    old.chmod(0o755)
    for path, want in ((f"{tmp_path}:/usr/bin:/bin", "python3.11"), (None, "python3")):
        env = {"PATH": path} if path else None
        script = snippet.replace("sudo apt-get", "true") + ' && echo "$py"'
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
        assert result.stdout.split()[-1] == want, result


def test_setup_multislice_visits_every_slice_and_counts_all_devices():
    lines = dry_run("setup.sh", "--type", "v5litepod-256", "--nodes", "2")[1:]  # after the tar
    nodes = [re.search(r"\bllm-\d", line).group() for line in lines]
    assert nodes == ["llm-0", "llm-1"] * 3  # copy, install, check: each on both slices
    assert "assert n == 512" in lines[-1]


def test_a_single_queued_slice_is_reached_by_its_own_name():
    lines = [line for line in dry_run("setup.sh", "--type", "v5p-128", "--queued")
             if "tpu-vm" in line]
    assert lines and all("llm-0" not in line and re.search(r"\bllm(?![-\w])", line)
                         for line in lines)


def test_launch_runs_the_same_command_on_all_workers_with_a_bucket_workdir():
    lines = dry_run(
        "launch.sh", "--bucket", "gs://bkt", "--experiment", "experiments/tiny_dense.py",
        "--run", "r1", "--", "train.steps=5",
    )
    assert lines[0] == (
        "gcloud compute tpus tpu-vm ssh llm --project=proj --zone=us-central2-b --worker=all "
        "'--command=cd ~/jaxllm && TFDS_DATA_DIR=gs://bkt/tensorflow_datasets nohup "
        "~/jaxllm-venv/bin/jaxllm "
        "pretrain experiments/tiny_dense.py workdir=gs://bkt/runs/r1 train.steps=5 "
        "> ~/r1.log 2>&1 &'"
    )


@pytest.mark.parametrize(
    "script, extra, expected",
    [
        ("status.sh", [], "gcloud compute tpus tpu-vm describe llm"),
        ("status.sh", ["--queued"], "gcloud compute tpus queued-resources describe llm"),
        ("logs.sh", ["--run", "r1"], "--worker=0 '--command=tail -n 100 ~/r1.log'"),
        ("stop.sh", [], "'--command=pkill -TERM -f '\\''jaxllm (pretrain|grpo)'\\'' || true'"),
        ("delete.sh", [], "gcloud compute tpus tpu-vm delete llm --project=proj --zone=us-central2-b --quiet"),
        ("delete.sh", ["--nodes", "2"], "queued-resources delete llm --project=proj --zone=us-central2-b --force --quiet"),
    ],
)
def test_status_logs_stop_delete(script, extra, expected):
    assert expected in dry_run(script, *extra)[0]


def test_env_file_supplies_settings_and_flags_override_it(tmp_path):
    env = tmp_path / "tpu.env"
    env.write_text("PROJECT=fromfile\nZONE=europe-west4-a\nNAME=envname\nTYPE=v6e-8\n")
    result = subprocess.run(
        ["bash", str(SCRIPTS / "create.sh"), "--env", str(env), "--name", "flag", "--dry-run"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == (
        "gcloud compute tpus tpu-vm create flag --project=fromfile --zone=europe-west4-a "
        "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--type", "v9-8"], "--type 'v9-8' is not one of"),
        (["--type", "v4-8", "--bogus"], "unknown flag '--bogus'"),
        (["--type", "v4-8", "--nodes", "zero"], "--nodes must be a positive integer"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(args, message):
    result = subprocess.run(
        ["bash", str(SCRIPTS / "create.sh"), *COMMON, *args], capture_output=True, text=True
    )
    assert result.returncode == 2 and message in result.stderr


def test_every_script_has_help_and_passes_shellcheck():
    scripts = sorted(SCRIPTS.glob("*.sh"))
    for script in scripts:
        if script.name != "lib.sh":
            result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
            assert result.returncode == 0 and "Usage:" in result.stdout, script.name
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", *map(str, scripts)], check=True, cwd=SCRIPTS.parent)
    else:
        for script in scripts:
            subprocess.run(["bash", "-n", str(script)], check=True)
