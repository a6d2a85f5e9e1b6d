"""Condition messages stay bounded: they name a few subjects and count the rest."""

from controller.models.resources import MAX_MESSAGE
from controller.planner.plan import INVALID_FACTS, PEER_PENDING, Issue
from controller.reconciler.reconcile import degraded_message


def test_pending_nodes_are_named_a_few_and_counted():
    issues = [Issue(PEER_PENDING, f"node n{i:03d} has not published", f"n{i:03d}") for i in range(199)]
    message = degraded_message(issues, {})
    assert message == "waiting for the facts of 199 node(s): n000, n001, n002 and 196 more"


def test_other_problems_are_listed_up_to_a_few_then_counted():
    issues = [Issue(INVALID_FACTS, f"node x{i} published invalid facts", f"x{i}") for i in range(5)]
    message = degraded_message(issues, {"web": "network namespace web does not exist (yet)"})
    assert message.count("published invalid facts") == 3
    assert message.endswith("and 3 more problem(s)")


def test_a_message_never_exceeds_the_bound():
    issues = [Issue(INVALID_FACTS, "x" * 5000, "n1")]
    assert len(degraded_message(issues, {})) == MAX_MESSAGE
