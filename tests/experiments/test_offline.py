"""The CLI is offline before any Hugging Face library reads its settings, and a mistyped model makes no network
attempt (subprocesses: the variables are read once per process, at import)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

HF_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_importing_the_cli_sets_offline_before_huggingface_hub_reads_it():
    code = (
        "import sys, kasa_peft.experiments.cli\n"
        "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules, 'CLI import pulled in HF/torch'\n"
        "import huggingface_hub.constants as c, datasets.config as d\n"
        "print(c.HF_HUB_OFFLINE, d.HF_HUB_OFFLINE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


def test_an_explicit_online_setting_is_respected():
    code = "import kasa_peft.experiments, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(HF_HUB_OFFLINE="0"), capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]


def test_unknown_model_fails_with_the_packaged_list_and_no_network_attempt(tmp_path):
    # A "Hub" that only listens: any download attempt would show up as a pending connection.
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen(8)
        hub.setblocking(False)
        env = _clean_env(HF_ENDPOINT=f"http://127.0.0.1:{hub.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"),
                         HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1")  # bounded, should it try
        out = subprocess.run(
            [sys.executable, "-m", "kasa_peft.experiments.cli", "train", "--task", "sst2", "--demo-data",
             "--model", "someone/not-a-model", "--output-dir", str(tmp_path / "run")],
            env=env, capture_output=True, text=True, timeout=300,
        )
        try:
            hub.accept()
            contacted = True
        except BlockingIOError:
            contacted = False
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "--model someone/not-a-model" in errors[0] and "minilm, smollm2" in errors[0]
    assert not contacted, "the CLI tried to reach the Hub"
    assert not (tmp_path / "run").exists()
