"""The per-round terminal line stays one readable line from 3 sites to 100."""

from __future__ import annotations

from fedrad.simulations.cli import MAX_LISTED_SITES, epsilon_text


def test_few_sites_are_listed_in_numeric_order() -> None:
    text = epsilon_text({"site_10": 1.5, "site_2": 2.25, "site_1": None})
    assert text == "site_1 unbounded, site_2 2.25, site_10 1.50"
    assert epsilon_text({}) == "no DP"


def test_many_sites_give_the_range_and_who_spent_most() -> None:
    eps: dict[str, float | None] = {f"site_{i}": 5.0 + i / 1000 for i in range(1, 101)}
    eps["site_7"] = 7.5
    eps["site_9"] = None
    text = epsilon_text(eps)
    assert text == "5.00-7.50 over 99 sites (highest site_7), unbounded at 1"
    assert len(text) < 80
    assert epsilon_text({f"s{i}": None for i in range(MAX_LISTED_SITES + 1)}) == (
        f"unbounded at all {MAX_LISTED_SITES + 1} sites"
    )
