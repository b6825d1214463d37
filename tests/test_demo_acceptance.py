"""Each setting's acceptance checks on hand-built summaries: every check passes on a table built to pass, and
fails when exactly its own condition is broken (the numbers below are worked out by hand). A check about a
method that did not run is left out, never printed as "not run"."""

import copy

import pytest

from zscl.settings import SETTINGS
from zscl.settings.acceptance import Scores

# Zero-shot row of a 5-task run: Last = mean = 66.0; Transfer = mean of tasks 2..5 = (45+90+60+95)/4 = 72.5.
ZS_ROW = [40.0, 45.0, 90.0, 60.0, 95.0]
ZS = {"transfer": 72.5, "avg": 66.0, "last": 66.0}
CHANCE = [100 / 6, 100 / 6, 100 / 6, 20.0, 20.0]  # min ratio 40 / 16.67 = 2.4
ROOM = {"zs_last_max": 75.0, "weak_tasks": {"count": 2, "below": 50.0}, "chance_ratio_min": 2.0}

MTIL_RULES = {**ROOM, "ft_learns": 8.0, "ft_forgets": 10.0, "zscl_keeps": 3.0, "zscl_vs_ft_last": 0.0,
              "best_of": ["finetune", "lwf", "icarl", "lwf_vr", "wise", "zscl"],
              "between": ["lwf", "icarl", "lwf_vr", "wise"]}
MTIL = {
    "finetune": {"transfer": 60.0, "avg": 70.0, "last": 80.0},  # learns +14, forgets 12.5
    "lwf": {"transfer": 63.5, "avg": 71.0, "last": 78.0},
    "icarl": {"transfer": 64.0, "avg": 72.0, "last": 81.0},
    "lwf_vr": {"transfer": 64.5, "avg": 71.0, "last": 77.0},
    "wise": {"transfer": 65.0, "avg": 70.5, "last": 79.0},
    "zscl": {"transfer": 70.0, "avg": 78.0, "last": 82.0},  # keeps within 2.5, learns more than finetune
}

FEWSHOT_RULES = {**ROOM, "ft_forgets": 10.0, "zscl_keeps": 5.0, "zscl_learns": 0.0, "lwf_below_ft": 0.0,
                 "lwf_below_zs": 0.0, "best_avg": {"methods": ["moe_adapters"], "of": ["finetune", "lwf", "wise", "zscl"]},
                 "lowest_last": {"methods": ["lwf"], "of": ["wise", "zscl", "moe_adapters"]}}
FEWSHOT = {
    "finetune": {"transfer": 55.0, "avg": 60.0, "last": 70.0},   # forgets 17.5
    "lwf": {"transfer": 60.0, "avg": 61.0, "last": 65.0},        # 5 below finetune's, 1 below zero-shot's Last
    "wise": {"transfer": 58.0, "avg": 62.0, "last": 71.0},
    "zscl": {"transfer": 68.5, "avg": 68.0, "last": 67.0},       # keeps within 4, Last 1 above zero-shot's
    "moe_adapters": {"transfer": 72.0, "avg": 70.0, "last": 75.0},  # best Avg by 2
}

CIL_RULES = {"zs_last_max": 50.0, "ft_forgets": 0.0, "zscl_above_ft": 0.0, "zscl_keeps": 0.0, "moe_reaches": 2.5,
             "moe_keeps": 0.0}
CIL_ZS = {"avg": 47.0, "last": 36.0}
CIL = {
    "finetune": {"avg": 57.0, "last": 25.0},       # Last 11 below zero-shot's
    "icarl": {"avg": 64.0, "last": 45.0},
    "zscl": {"avg": 65.0, "last": 48.0},           # above finetune (8, 23) and zero-shot (18, 12)
    "moe_adapters": {"avg": 63.0, "last": 49.0},   # Avg 2 below ZSCL's: within 2.5; above zero-shot (16, 13)
}

XTAIL_RULES = {"keeps_zero_shot": {"methods": ["rail_primal", "rail_dual"], "within": 0.5},
               "learns": {"methods": ["rail_primal", "rail_dual"], "min": 5.0},
               "best_last": {"methods": ["rail_primal", "rail_dual"], "of": ["finetune", "zscl", "moe_adapters"]},
               "ft_forgets": 25.0, "zscl_lead_max": 30.0, "zscl_edge_max": 4.0,
               "faster": {"method": "rail_primal", "than": "zscl", "ratio": 5.0}}
XTAIL = {
    "finetune": {"transfer": 40.0, "avg": 45.0, "last": 50.0},     # forgets 32.5
    "zscl": {"transfer": 70.0, "avg": 52.0, "last": 55.0},         # Avg lead 7 < 30; edge -14 < 4
    "moe_adapters": {"transfer": 72.5, "avg": 60.0, "last": 60.0},
    "rail_primal": {"transfer": 72.5, "avg": 75.0, "last": 85.0},  # keeps exactly, learns 19
    "rail_dual": {"transfer": 72.8, "avg": 75.0, "last": 86.0},    # keeps +0.3, learns 20, best Last by 26
}
SECONDS = {"zscl": 30.0, "rail_primal": 5.0, "rail_dual": 8.0, "finetune": 10.0, "moe_adapters": 40.0}  # 6x

CASES = {  # setting -> (rules, summaries, zero-shot, number of checks when every method ran)
    "mtil": (MTIL_RULES, MTIL, ZS, 3 + 4 + 1 + 4),
    "few_shot": (FEWSHOT_RULES, FEWSHOT, ZS, 3 + 7),
    "cil": (CIL_RULES, CIL, CIL_ZS, 1 + 1 + 4 + 1 + 2),
    "xtail": (XTAIL_RULES, XTAIL, ZS, 2 * 2 + 2 + 1 + 1 + 1 + 1 + 1),
}


def _checks(setting, summaries, rules=None, zero_shot=None, row=ZS_ROW, seconds=SECONDS):
    case_rules, _, case_zs, _ = CASES[setting]
    scores = Scores(summaries, zero_shot or case_zs, row, CHANCE, seconds)
    return SETTINGS.get(setting).acceptance(scores, case_rules if rules is None else rules)


def test_every_setting_has_its_own_checks():
    builtin = {name for name, cls in SETTINGS.items() if cls.__module__.startswith("zscl.settings.")}
    assert set(CASES) == builtin, "a new built-in setting needs its acceptance case here"


@pytest.mark.parametrize("setting", sorted(CASES))
def test_every_check_passes_on_the_published_pattern(setting):
    _, summaries, _, n = CASES[setting]
    checks = _checks(setting, summaries)
    assert len(checks.items) == n and checks.skipped == 0
    assert all(c["passed"] is True for c in checks.items), checks.items


def test_mtil_values_are_the_hand_worked_margins():
    values = {c["check"].split(":")[0]: c["value"] for c in _checks("mtil", MTIL).items}
    assert values["room to learn"] == 66.0 and values["finetune learns"] == 14.0
    assert values["finetune forgets"] == 12.5 and values["ZSCL keeps"] == -2.5 and values["ZSCL learns"] == 2.0
    assert values["ZSCL best"] == 6.0  # 78 - iCaRL's 72


@pytest.mark.parametrize("setting, method, key, value, broken", [
    ("mtil", "finetune", "last", 73.9, "finetune learns"),          # 73.9 - 66 = 7.9 < 8
    ("mtil", "finetune", "transfer", 62.6, "finetune forgets"),     # 72.5 - 62.6 = 9.9 < 10
    ("mtil", "zscl", "transfer", 69.4, "ZSCL keeps"),               # 69.4 - 72.5 = -3.1 < -3
    ("mtil", "zscl", "last", 79.9, "ZSCL learns"),                  # below finetune's 80
    ("mtil", "icarl", "avg", 78.0, "ZSCL best"),                    # a tie is not "highest"
    ("mtil", "wise", "transfer", 60.0, "wise keeps more"),          # equal to finetune's is not "above"
    ("few_shot", "finetune", "transfer", 62.6, "finetune forgets"),  # 9.9 < 10
    ("few_shot", "zscl", "transfer", 67.4, "ZSCL keeps"),           # 67.4 - 72.5 = -5.1 < -5
    ("few_shot", "zscl", "last", 66.0, "ZSCL learns"),              # equal to zero-shot's Last is not above
    ("few_shot", "zscl", "avg", 70.0, "moe_adapters best Avg"),     # a tie with ZSCL is not "best"
    ("few_shot", "lwf", "last", 66.0, "LwF ends below zero-shot"),  # level with zero-shot's (still below finetune's)
    ("few_shot", "finetune", "last", 64.0, "LwF ends below finetune"),  # 1 below LwF's
    ("few_shot", "wise", "last", 64.9, "lwf lowest Last"),          # WiSE-FT ends lower
    ("cil", "moe_adapters", "last", 36.0, "MoE-Adapters above zero-shot: Last"),  # level
    ("cil", "finetune", "last", 36.0, "finetune forgets"),          # level with zero-shot's
    ("cil", "finetune", "avg", 65.0, "ZSCL above finetune: Avg"),    # a tie
    ("cil", "zscl", "last", 35.9, "ZSCL keeps zero-shot: Last"),    # 0.1 below zero-shot's (still above finetune)
    ("cil", "moe_adapters", "avg", 62.4, "MoE-Adapters reaches"),   # 2.6 below ZSCL's
    ("xtail", "rail_primal", "transfer", 72.4, "rail_primal keeps zero-shot"),  # 0.1 below
    ("xtail", "rail_dual", "transfer", 73.1, "rail_dual stays at zero-shot"),   # 0.6 above: not zero-shot's
    ("xtail", "rail_primal", "last", 70.9, "rail_primal learns"),   # 70.9 - 66 = 4.9 < 5
    ("xtail", "moe_adapters", "last", 86.0, "rail_primal / rail_dual best Last"),  # a tie
    ("xtail", "finetune", "transfer", 47.6, "finetune forgets"),    # 24.9 < 25
    ("xtail", "finetune", "avg", 22.0, "ZSCL's Avg lead"),          # 30: not below 30
    ("xtail", "zscl", "avg", 70.0, "ZSCL's Avg edge"),              # 70 - 66 = 4: not below 4
])
def test_each_check_fails_alone_when_its_condition_breaks(setting, method, key, value, broken):
    summaries = copy.deepcopy(CASES[setting][1])
    summaries[method][key] = value
    failed = [c["check"] for c in _checks(setting, summaries).items if not c["passed"]]
    assert len(failed) == 1 and failed[0].startswith(broken), failed


def test_faster_reads_cpu_seconds():
    checks = _checks("xtail", XTAIL, seconds={**SECONDS, "rail_primal": 6.1})  # 30 / 6.1 = 4.9 < 5
    assert [c["check"] for c in checks.items if not c["passed"]] == ["rail_primal faster: zscl's sequence CPU time / rail_primal's"]


def test_room_to_learn_checks_read_the_zero_shot_row():
    def room(row):
        zs = {"transfer": sum(row[1:]) / 4, "avg": sum(row) / 5, "last": sum(row) / 5}
        return [c["passed"] for c in _checks("mtil", {}, zero_shot=zs, row=row).items]

    assert room([80.0, 70.0, 90.0, 60.0, 95.0]) == [False, False, True]  # Last 79; one task under 50
    assert room([30.0, 45.0, 90.0, 40.0, 90.0]) == [True, True, False]  # 30 / (100/6) = 1.8 < 2x chance


@pytest.mark.parametrize("setting", sorted(CASES))
def test_checks_of_methods_not_run_are_left_out(setting):
    _, summaries, _, n = CASES[setting]
    only = {"finetune": summaries["finetune"]}
    checks = _checks(setting, only)
    assert all(c["passed"] is not None for c in checks.items)
    assert checks.skipped > 0 and len(checks.items) + checks.skipped <= n
    assert not any("zscl" in c["check"].lower() or "rail" in c["check"] for c in checks.items)


def test_a_null_threshold_switches_a_check_off():
    rules = {**MTIL_RULES, "ft_learns": None, "between": []}
    names = [c["check"] for c in _checks("mtil", MTIL, rules=rules).items]
    assert not any(n.startswith(("finetune learns", "wise keeps")) for n in names) and len(names) == 12 - 1 - 4


def test_equal_metrics_that_differ_by_round_off_are_equal():
    """RAIL's Transfer equals zero-shot's cell by cell, but the two means are taken in different orders: a
    difference of -1e-15 must pass "Transfer - ZS Transfer >= 0" (it failed a demo run before the rounding)."""
    zs = {**ZS, "transfer": 66.2 + 1e-14}
    checks = _checks("xtail", XTAIL | {"rail_primal": {**XTAIL["rail_primal"], "transfer": 66.2}}, zero_shot=zs,
                     rules={"keeps_zero_shot": {"methods": ["rail_primal"], "within": 0.5}})
    assert [c["passed"] for c in checks.items] == [True, True] and checks.items[0]["value"] == 0.0


def test_a_malformed_best_rule_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"acceptance rule 'best_avg' needs \{methods: \[...\], of: \[...\]\}"):
        _checks("few_shot", FEWSHOT, rules={"best_avg": {"methods": ["moe_adapters"]}})
