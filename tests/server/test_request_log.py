"""Request log lines: the sampling fields that differ from the defaults, and never the client's text."""

import logging

from hylo.outputs import CompletionOutput, RequestOutput
from hylo.sampling import SamplingParams
from hylo.server.request_log import log_finished, log_received, params_summary


def test_the_summary_counts_stop_strings_and_cuts_long_values():
    summary = params_summary(SamplingParams(temperature=0, max_tokens=20, stop=["secret words", "more"], stop_token_ids=list(range(100))))
    assert "temperature=0" in summary and "max_tokens=20" in summary and "stop=2 strings" in summary
    assert "secret" not in summary and len(summary) < 200
    assert params_summary(SamplingParams()) == "defaults"


def test_lines_hold_token_counts_not_text(caplog):
    caplog.set_level(logging.INFO, logger="hylo.requests")
    log_received("cmpl-1", "completions", "base", [{"prompt": "my private prompt", "prompt_token_ids": [1, 2, 3]}], SamplingParams(n=2))
    done = CompletionOutput(0, "private output", [4, 5], None, None, "length")
    log_finished("cmpl-1", [RequestOutput("cmpl-1-0", "my private prompt", [1, 2, 3], [done], True)], 0.5)
    text = caplog.text
    assert "request cmpl-1 received: completions, model base, prompt tokens 3; n=2" in text
    assert "request cmpl-1 finished: length, 2 tokens generated in 0.50 s" in text
    assert "private" not in text
