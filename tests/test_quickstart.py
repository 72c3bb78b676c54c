import subprocess
import sys


def test_quickstart_command_runs_and_is_lossless(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jetspec_trt.cli", "quickstart", "--workdir", str(tmp_path),
                           "--max-new-tokens", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "lossless check: IDENTICAL" in done.stderr
    assert "tau" in done.stderr
