"""The demo's acceptance checks on hand-built summaries: each check passes on a table built to pass,
and fails when exactly its own condition is broken (the numbers below are worked out by hand)."""

import copy

import pytest

from zscl.synthetic.report import acceptance

# Zero-shot row of a 5-task run: Last = mean = 66.0; Transfer = mean of tasks 2..5 = (45+90+60+95)/4 = 72.5.
ZS = [40.0, 45.0, 90.0, 60.0, 95.0]
CHANCE = [100 / 6, 100 / 6, 100 / 6, 20.0, 20.0]  # min ratio 40 / 16.67 = 2.4
PASSING = {
    "finetune": {"transfer": 60.0, "avg": 70.0, "last": 80.0},  # learns +14, forgets 12.5
    "lwf": {"transfer": 63.5, "avg": 71.0, "last": 78.0},
    "icarl": {"transfer": 64.0, "avg": 72.0, "last": 81.0},
    "lwf_vr": {"transfer": 64.5, "avg": 71.0, "last": 77.0},
    "wise": {"transfer": 65.0, "avg": 70.5, "last": 79.0},
    "zscl": {"transfer": 70.0, "avg": 78.0, "last": 82.0},  # keeps within 2.5, learns more than finetune
}


def _verdicts(summaries, zero_shot=ZS):
    return {c["check"]: c["passed"] for c in acceptance(summaries, zero_shot, CHANCE)}


def test_every_check_passes_on_the_paper_pattern():
    checks = acceptance(PASSING, ZS, CHANCE)
    assert len(checks) == 3 + 4 + 1 + 4 and all(c["passed"] is True for c in checks), checks
    values = {c["check"].split(":")[0]: c["value"] for c in checks}
    assert values["room to learn"] == 66.0 and values["finetune learns"] == 14.0
    assert values["finetune forgets"] == 12.5 and values["ZSCL keeps"] == -2.5 and values["ZSCL learns"] == 2.0
    assert values["ZSCL best"] == 6.0  # 78 - iCaRL's 72


@pytest.mark.parametrize("method, key, value, broken", [
    ("finetune", "last", 73.9, "finetune learns"),          # 73.9 - 66 = 7.9 < 8
    ("finetune", "transfer", 62.6, "finetune forgets"),     # 72.5 - 62.6 = 9.9 < 10
    ("zscl", "transfer", 69.4, "ZSCL keeps"),               # 69.4 - 72.5 = -3.1 < -3
    ("zscl", "last", 79.9, "ZSCL learns"),                  # below finetune's 80
    ("icarl", "avg", 78.0, "ZSCL best"),                    # a tie is not "highest"
    ("wise", "transfer", 60.0, "wise keeps more"),          # equal to finetune's is not "above"
])
def test_each_check_fails_alone_when_its_condition_breaks(method, key, value, broken):
    summaries = copy.deepcopy(PASSING)
    summaries[method][key] = value
    failed = [name for name, ok in _verdicts(summaries).items() if not ok]
    assert len(failed) == 1 and failed[0].startswith(broken), failed


def test_room_to_learn_checks_read_the_zero_shot_row():
    assert [c["passed"] for c in acceptance({}, [80.0, 70.0, 90.0, 60.0, 95.0], CHANCE)[:3]] == [False, False, True]
    # 30 / (100/6) = 1.8 < 2x chance; two tasks under 50; Last 59
    assert [c["passed"] for c in acceptance({}, [30.0, 45.0, 90.0, 40.0, 90.0], CHANCE)[:3]] == [True, True, False]


def test_missing_methods_read_not_run():
    checks = acceptance({"finetune": PASSING["finetune"]}, ZS, CHANCE)
    by = {c["check"].split(":")[0]: c["passed"] for c in checks}
    assert by["finetune learns"] is True and by["ZSCL keeps"] is None and by["ZSCL best"] is None

