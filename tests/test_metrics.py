"""nanorlhf/metrics.py's Spearman correlation against hand-computed cases and a plain loop."""
import math
import random

from nanorlhf.metrics import average_ranks, spearman


def loop_spearman(x, y):
    """Textbook: rank = 1 + (values below) + (other values equal) / 2, then Pearson's formula."""
    def ranks(v):
        return [1 + sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2 for a in v]
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_ties_share_their_average_rank():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks([3, 3, 3]).tolist() == [2, 2, 2]
    # ranks [5, 4, 3, 2, 1] against [2, 2, 2, 4.5, 4.5]: -sqrt(3)/2, where ranking ties by position gave -1
    assert math.isclose(spearman([5, 4, 3, 2, 1], [0, 0, 0, 1, 1]), -math.sqrt(3) / 2)


def test_a_constant_side_has_no_correlation():
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))


def test_matches_the_textbook_loop_on_tie_heavy_data():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(3, 30)
        x = [rng.choice([0, 0, 0, 1, 2, 2.5]) for _ in range(n)]  # like gushing-word counts: mostly 0
        y = [rng.gauss(0, 1) for _ in range(n)]
        if len(set(x)) > 1:
            assert math.isclose(spearman(x, y), loop_spearman(x, y), abs_tol=1e-12)
