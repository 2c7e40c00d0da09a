"""From reward scores to preferences and verdicts: the (best, worst) pair of a prompt's samples, and the win rate
of model A over model B with ties excluded and a Wilson 95% interval."""
import math
import re
from collections import Counter


def best_worst_pair(samples, min_gap=0.0):
    """The highest- and lowest-scored of one prompt's samples, or None when their gap is below min_gap.

    Args:
        samples: list of dicts with at least "response" and "score" (already filtered, e.g. no empty ones).
        min_gap: keep the pair only if best score - worst score >= min_gap (and always > 0: equal scores
            say nothing about which answer is better).
    Returns:
        (best, worst) sample dicts, or None.
    """
    if len(samples) < 2:
        return None
    best = max(samples, key=lambda s: s["score"])
    worst = min(samples, key=lambda s: s["score"])
    gap = best["score"] - worst["score"]
    if gap <= 0 or gap < min_gap:
        return None
    return best, worst


def text_similarity(a, b):
    """Cosine similarity of the two texts' word counts (words: lowercased runs of letters, digits and _): 1.0 for
    the same words in the same numbers, 0.0 for no word in common (or an empty text). Cheap, and enough to spot a
    near-duplicate pair."""
    ca, cb = (Counter(re.findall(r"\w+", t.lower())) for t in (a, b))
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return dot / norm if norm else 0.0


def wilson_interval(wins, n, z=1.959964):
    """Wilson score interval for a binomial proportion wins/n (better than p ± z·se for small n or p near 0/1)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at wins = 0 or n an exact end is p itself (0 or 1); rounding must not put it outside [0, 1] or past p
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def win_rate(scores_a, scores_b, tie_eps=0.0):
    """A's win rate over B on paired scores: wins / (wins + losses); ties (|a - b| <= tie_eps) counted apart.

    Returns a dict: wins, losses, ties, n (prompts), win_rate, ci95 (Wilson, over wins + losses), mean rewards,
    and margin_weighted_win_rate = sum of A's winning margins / sum of all |margins| (ties excluded). A value with
    nothing to average (no decided prompt, no prompt) is None: JSON null, never NaN.
    """
    assert len(scores_a) == len(scores_b), "one score of each model per prompt"
    assert all(math.isfinite(s) for s in [*scores_a, *scores_b]), "non-finite score: not a verdict"
    diffs = [a - b for a, b in zip(scores_a, scores_b)]
    wins = sum(d > tie_eps for d in diffs)
    losses = sum(d < -tie_eps for d in diffs)
    ties = len(diffs) - wins - losses
    decided = wins + losses
    total_margin = sum(abs(d) for d in diffs if abs(d) > tie_eps)
    low, high = wilson_interval(wins, decided)
    n = len(diffs)
    return dict(wins=wins, losses=losses, ties=ties, n=n,
                win_rate=wins / decided if decided else None, ci95=[low, high],
                mean_reward_a=sum(scores_a) / n if n else None,
                mean_reward_b=sum(scores_b) / n if n else None,
                margin_weighted_win_rate=sum(d for d in diffs if d > tie_eps) / total_margin if total_margin else None)
