"""The front doors' common ending: backpack_nb.errors.command."""

from __future__ import annotations

import pytest

from backpack_nb.errors import INTERRUPTED_STATUS, UserError, command


def test_user_error_is_one_line_and_status_2(capsys):
    @command
    def main(argv=None):
        raise UserError("--x 3 is out of range; pass 0..2")

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --x 3 is out of range; pass 0..2\n"


def test_ctrl_c_is_one_line_and_status_130(capsys):
    @command
    def main(argv=None):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == INTERRUPTED_STATUS == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted (Ctrl-C)") and err.count("\n") == 1


def test_result_and_other_errors_pass_through():
    @command
    def ok(argv=None):
        return 0

    @command
    def bug(argv=None):
        raise ValueError("a bug, not a user's mistake")

    assert ok([]) == 0
    with pytest.raises(ValueError):
        bug([])
