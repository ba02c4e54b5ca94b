"""Progress bars draw on a terminal only: redirected stderr gets no carriage-return redraws."""

from __future__ import annotations

import io

from csmf.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draw(monkeypatch, stream, enabled=True) -> tuple[bool, str]:
    monkeypatch.setattr("sys.stderr", stream)
    with progress_bar(100, "work", "it", enabled, file=stream, mininterval=0) as bar:
        disabled = bar.disable  # (close() sets it)
        for _ in range(100):
            bar.update(1)
    return disabled, stream.getvalue()


def test_bar_only_on_a_terminal(monkeypatch):
    disabled, text = _draw(monkeypatch, _Tty())
    assert not disabled and text.count("\r") >= 10 and "100/100" in text
    disabled, text = _draw(monkeypatch, io.StringIO())  # a file or a pipe
    assert disabled and text == ""
    disabled, text = _draw(monkeypatch, _Tty(), enabled=False)  # --no-progress / --quiet
    assert disabled and text == ""
