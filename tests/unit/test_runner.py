import logging
import sys

import pytest

from imgstorage.errors import CommandError
from imgstorage.runner import Runner


def test_success_and_output():
    r = Runner().run([sys.executable, "-c", "print('hi')"])
    assert (r.returncode, r.stdout) == (0, "hi\n")


def test_failure_carries_command_and_stderr():
    with pytest.raises(CommandError) as exc:
        Runner().run([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    assert "failed (exit 3): boom" in str(exc.value)
    assert exc.value.returncode == 3


def test_unchecked_failure_returns_result():
    r = Runner().run([sys.executable, "-c", "import sys; sys.exit(4)"], check=False)
    assert r.returncode == 4


def test_missing_command_and_timeout():
    with pytest.raises(CommandError, match="command not found"):
        Runner().run(["no-such-command-imgstorage"])
    with pytest.raises(CommandError, match="timed out"):
        Runner().run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)


def test_arguments_are_never_interpreted_by_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    r = Runner().run(["echo", f"x; touch {marker}"])
    assert r.stdout == f"x; touch {marker}\n" and not marker.exists()


def test_secrets_stay_out_of_logs_and_errors(caplog):
    caplog.set_level(logging.DEBUG, logger="imgstorage.runner")
    code = "import sys; sys.stderr.write('bad password ' + sys.argv[1]); sys.exit(1)"
    with pytest.raises(CommandError) as exc:
        Runner().run([sys.executable, "-c", code, "hunter2-secret"], redact=["hunter2-secret"])
    assert "hunter2-secret" not in str(exc.value)
    assert "hunter2-secret" not in caplog.text
    Runner().run([sys.executable, "-c", "pass", "hunter2-secret"], redact=["hunter2-secret"])
    assert "hunter2-secret" not in caplog.text
