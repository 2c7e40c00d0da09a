"""Pure pieces behind gen_synthetic.py and eval_winrate.py, against numbers worked out by hand: the win rate with
ties excluded, its Wilson interval, the margin-weighted win rate, the (best, worst) pair of a prompt's samples,
and the kill-proof JSONL (torn last line dropped, atomic rewrite, errors that name file:line)."""
import json
import math

import pytest

from nanoalign import jsonl
from nanoalign.jsonl import ResumableJsonl, read_jsonl
from nanoalign.preferences import best_worst_pair, wilson_interval, win_rate

Z = 1.959964
Z2 = 3.841458881  # Z * Z = (1.96 - 0.000036)^2 = 3.8416 - 0.00014112 + 0.0000000013


# -----------------------------------------------------------------------------
# win rate

def test_win_rate_30_wins_10_losses_5_ties():
    # A beats B on 30 prompts by 1.0, loses 10 by 1.0, ties 5 at 0.5 each
    a = [1.0] * 30 + [0.0] * 10 + [0.5] * 5
    b = [0.0] * 30 + [1.0] * 10 + [0.5] * 5
    r = win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (30, 10, 5, 45)
    assert r["win_rate"] == 0.75  # 30 / 40: the 5 ties are counted, not in the denominator
    # Wilson over n = 40 decided, p = 0.75:
    #   z^2/n = 0.0960365, denom = 1.0960365
    #   center = (0.75 + 0.0480182) / 1.0960365 = 0.7280946
    #   half = 1.959964 * sqrt(0.1875/40 + 3.8414589/6400) / 1.0960365
    #        = 1.959964 * sqrt(0.0046875 + 0.0006002) / 1.0960365 = 1.959964 * 0.0727168 / 1.0960365 = 0.1300342
    #   -> [0.5980604, 0.8581288]
    low, high = r["ci95"]
    assert low == pytest.approx(0.5981, abs=5e-5) and high == pytest.approx(0.8581, abs=5e-5)
    assert r["mean_reward_a"] == pytest.approx(32.5 / 45)  # (30 * 1 + 5 * 0.5) / 45 = 0.72222
    assert r["mean_reward_b"] == pytest.approx(12.5 / 45)  # (10 * 1 + 5 * 0.5) / 45 = 0.27778
    assert r["margin_weighted_win_rate"] == pytest.approx(0.75)  # 30 * 1.0 / (30 * 1.0 + 10 * 1.0)


def test_margin_weighted_win_rate_and_means_on_a_small_example():
    a = [1.0, 0.5, 0.25, 0.75]
    b = [0.0, 0.75, 0.25, 0.5]
    # diffs: +1.0 (win), -0.25 (loss), 0 (tie), +0.25 (win)
    r = win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(2 / 3)
    assert r["margin_weighted_win_rate"] == pytest.approx(1.25 / 1.5)  # (1.0 + 0.25) / (1.0 + 0.25 + 0.25) = 0.8333
    assert r["mean_reward_a"] == pytest.approx(0.625)  # 2.5 / 4
    assert r["mean_reward_b"] == pytest.approx(0.375)  # 1.5 / 4
    # Wilson for 2 of 3: p = 2/3, z^2/n = 1.2804863, denom = 2.2804863
    #   center = (0.6666667 + 0.6402431) / 2.2804863 = 0.5730838
    #   half = 1.959964 * sqrt(0.0740741 + 0.1067072) / 2.2804863 = 1.959964 * 0.4251838 / 2.2804863 = 0.3654242
    #   -> [0.2076596, 0.9385080]
    low, high = r["ci95"]
    assert low == pytest.approx(0.2077, abs=5e-5) and high == pytest.approx(0.9385, abs=5e-5)


def test_tie_eps_turns_small_margins_into_ties():
    a = [1.0, 0.5, 0.25, 0.75]
    b = [0.0, 0.75, 0.25, 0.5]
    # tie_eps 0.25: |diff| <= 0.25 is a tie, the boundary included -> only the +1.0 is decided
    r = win_rate(a, b, tie_eps=0.25)
    assert (r["wins"], r["losses"], r["ties"]) == (1, 0, 3)
    assert r["win_rate"] == 1.0
    assert r["margin_weighted_win_rate"] == 1.0  # ties leave the margin sums too: 1.0 / 1.0
    # Wilson for 1 of 1: center = (1 + z^2/2) / (1 + z^2), half = (z^2/2) / (1 + z^2), so
    #   low = 1 / (1 + z^2) = 1 / 4.8414589 = 0.2065493, high = 1
    low, high = r["ci95"]
    assert low == pytest.approx(1 / (1 + Z2), abs=1e-6) and low == pytest.approx(0.2065, abs=5e-5)
    assert high == pytest.approx(1.0, abs=1e-12)
    # just above the boundary the small margins count again
    r = win_rate(a, b, tie_eps=0.2)
    assert (r["wins"], r["losses"], r["ties"]) == (2, 1, 1)


def test_all_ties_give_no_win_rate_and_the_whole_interval():
    r = win_rate([0.5, 0.25, 1.0], [0.5, 0.25, 1.0])
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (0, 0, 3, 3)
    assert r["win_rate"] is None and r["margin_weighted_win_rate"] is None  # JSON null, never NaN
    assert r["ci95"] == [0.0, 1.0]
    assert r["mean_reward_a"] == r["mean_reward_b"] == pytest.approx(1.75 / 3)
    assert win_rate([], [])["mean_reward_a"] is None
    json.dumps(win_rate([], []), allow_nan=False)
    with pytest.raises(AssertionError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(AssertionError, match="non-finite"):
        win_rate([1.0, float("nan")], [1.0, 2.0])


def test_wilson_bounds_stay_in_the_unit_interval():
    # 0 of 135: the exact lower end is 0, but center - half rounds to -1.7e-18 ("-0.000" when printed)
    low, high = wilson_interval(0, 135)
    assert low == 0.0 and f"{low:.3f}" == "0.000" and high == pytest.approx(Z * Z / (135 + Z * Z), abs=1e-12)
    for n in range(1, 400):
        for wins in (0, n):
            low, high = wilson_interval(wins, n)
            assert 0.0 <= low <= high <= 1.0 and f"{low:.3f}"[0] != "-"
            # the interval holds the observed rate: 136 of 136 gave high 0.9999999999999999 < 1.0, and the
            # demo's error bar (high - win_rate) came out negative
            assert low <= wins / n <= high, (wins, n, low, high)


@pytest.mark.parametrize("wins,n", [(0, 5), (3, 7), (30, 40), (99, 100), (100, 100)])
def test_wilson_endpoints_solve_the_score_equation(wins, n):
    # the Wilson interval is {p : |p_hat - p| <= z * sqrt(p (1 - p) / n)}: its ends are the roots of
    # (p_hat - p)^2 = z^2 p (1 - p) / n, a second reference besides the closed form
    low, high = wilson_interval(wins, n)
    p_hat = wins / n
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(Z * Z * p * (1 - p) / n, abs=1e-12)
    assert 0.0 <= low <= p_hat <= high <= 1.0 + 1e-12
    assert wilson_interval(0, 0) == (0.0, 1.0)


# -----------------------------------------------------------------------------
# best / worst pair

def test_best_worst_pair_picks_max_and_min():
    samples = [dict(response="a", score=0.25), dict(response="b", score=1.0), dict(response="c", score=-0.5),
               dict(response="d", score=0.5)]
    best, worst = best_worst_pair(samples)
    assert best is samples[1] and worst is samples[2]
    assert best_worst_pair(samples, min_gap=1.5) == (samples[1], samples[2])  # gap 1.0 - (-0.5) = 1.5: kept
    assert best_worst_pair(samples, min_gap=1.5001) is None


def test_best_worst_pair_none_for_equal_scores_and_too_few_samples():
    assert best_worst_pair([dict(response="a", score=0.3), dict(response="b", score=0.3)]) is None  # min_gap 0
    assert best_worst_pair([dict(response="a", score=0.3), dict(response="b", score=0.3)], min_gap=-1.0) is None
    assert best_worst_pair([dict(response="a", score=0.3)]) is None
    assert best_worst_pair([]) is None


# -----------------------------------------------------------------------------
# ResumableJsonl / read_jsonl

def lines(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def test_torn_last_line_is_dropped_on_reopen(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    f = ResumableJsonl(path)  # creates the folder, no file yet
    assert f.rows == []
    rows = [{"i": 0, "text": "héllo"}, {"i": 1}, {"i": 2}]
    f.append(rows[:2])
    f.append(rows[2:])
    f.append([])
    assert path.read_bytes() == lines(rows)
    with path.open("a") as h:  # a kill in the middle of a write
        h.write('{"i": 3, "te')
    f = ResumableJsonl(path)
    assert f.rows == rows
    assert path.read_bytes() == lines(rows)  # the torn bytes are gone from the file too
    f.append([{"i": 3}])
    assert read_jsonl(path) == rows + [{"i": 3}]
    # a file holding nothing but a torn line
    path.write_text('{"i": 0')
    assert ResumableJsonl(path).rows == [] and path.read_bytes() == b""


def test_rewrite_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    f = ResumableJsonl(path)
    f.append([{"i": 0}, {"i": 1}, {"i": 2}])
    f.rewrite([{"i": 0}, {"i": 2}])
    assert path.read_bytes() == lines([{"i": 0}, {"i": 2}]) and f.rows == [{"i": 0}, {"i": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no temp file left
    assert ResumableJsonl(path).rows == [{"i": 0}, {"i": 2}]

    # killed before the rename: the old file is whole, never half-written
    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonl.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        f.rewrite([{"i": 9}])
    assert path.read_bytes() == lines([{"i": 0}, {"i": 2}])


def test_read_jsonl_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 2,}\n{"i": 3}\n')  # line 2 blank (skipped), line 3 malformed
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON"):
        read_jsonl(path)
    # a resumable file drops a malformed line that is not the last, from the file too, and says so in one line
    assert ResumableJsonl(path).rows == [{"i": 0}, {"i": 3}]
    assert capsys.readouterr().out == (f"{path}:3: not JSON (Expecting property name enclosed in double quotes, "
                                       f"column 9): dropped 1 damaged row (line 3)\n")
    assert path.read_bytes() == b'{"i": 0}\n{"i": 3}\n'  # whole lines kept as they were
    path.write_text('{"i": 0}\n\n{"i": 2}\n')
    assert read_jsonl(path) == [{"i": 0}, {"i": 2}]
