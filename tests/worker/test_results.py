"""Delivery results: what a reply means (`result_for`) and how an attempt changes a message's status
(`record`)."""

from __future__ import annotations

import pytest

from hedwigpy.smtp import Reply
from hedwigpy.storage import Attempt, DeliveryStatus, Envelope, RecipientStatus
from hedwigpy.worker.results import Delivered, PermanentFailure, Result, TransientFailure, record, result_for

HOST = "mx.example.net[192.0.2.1]"
OK = Reply(250, "2.0.0", "Ok: queued as 1234")
LATER = Reply(451, "4.3.0", "try again")
NEVER = Reply(550, "5.1.1", "no such user")


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (Reply(250, "2.0.0", "ok"), Delivered),
        (Reply(251, "2.1.5", "will forward"), Delivered),
        (Reply(421, "4.3.2", "closing"), TransientFailure),
        (Reply(452, "4.2.2", "mailbox full"), TransientFailure),
        (Reply(550, "5.1.1", "unknown"), PermanentFailure),
        (Reply(554, "5.7.1", "rejected"), PermanentFailure),
    ],
)
def test_result_for(reply: Reply, kind: type) -> None:
    result = result_for("bob@example.net", reply, HOST)
    assert type(result) is kind
    assert (result.recipient, result.reply, result.host) == ("bob@example.net", reply, HOST)


def test_result_for_a_transient_failure_has_no_wait() -> None:
    result = result_for("bob@example.net", LATER, HOST)
    assert isinstance(result, TransientFailure) and result.not_before is None


def status_of(*addresses: str) -> DeliveryStatus:
    return DeliveryStatus.initial(Envelope(sender="a@example.org", recipients=addresses))


def test_record_transitions() -> None:
    status = status_of("ok@x.test", "never@x.test", "later@x.test", "untouched@x.test")
    results: list[Result] = [
        Delivered("ok@x.test", OK, HOST),
        PermanentFailure("never@x.test", NEVER, HOST),
        TransientFailure("later@x.test", LATER, ""),
    ]
    after = record(status, results, 1000.0)
    assert after.attempts == 1
    assert after.next_attempt is None
    assert after.recipients == (
        RecipientStatus(
            "ok@x.test", "delivered", 1, Attempt(1000.0, 250, "2.0.0", "Ok: queued as 1234", HOST)
        ),
        RecipientStatus("never@x.test", "failed", 1, Attempt(1000.0, 550, "5.1.1", "no such user", HOST)),
        RecipientStatus("later@x.test", "pending", 1, Attempt(1000.0, 451, "4.3.0", "try again", "")),
        RecipientStatus("untouched@x.test", "pending", 0, None),  # not tried this time: as it was
    )
    assert after.pending() == ("later@x.test", "untouched@x.test")


def test_record_counts_attempts_across_runs() -> None:
    status = status_of("later@x.test", "ok@x.test")
    status = record(status, [TransientFailure("later@x.test", LATER, HOST)], 1.0)
    status = record(
        status, [TransientFailure("later@x.test", LATER, HOST), Delivered("ok@x.test", OK, HOST)], 2.0
    )
    status = record(status, [Delivered("later@x.test", OK, HOST)], 3.0)
    assert status.attempts == 3
    later, ok = status.recipients
    assert (later.state, later.attempts, later.last and later.last.at) == ("delivered", 3, 3.0)
    assert (ok.state, ok.attempts, ok.last and ok.last.at) == ("delivered", 1, 2.0)
    assert status.pending() == ()


def test_record_never_changes_a_finished_recipient() -> None:
    status = record(status_of("ok@x.test"), [Delivered("ok@x.test", OK, HOST)], 1.0)
    again = record(status, [PermanentFailure("ok@x.test", NEVER, HOST)], 2.0)
    assert again.recipients == status.recipients
    assert again.attempts == 2


def test_record_ignores_results_for_unknown_recipients() -> None:
    status = status_of("a@x.test")
    after = record(status, [Delivered("stranger@x.test", OK, HOST)], 1.0)
    assert after.recipients == status.recipients


def test_next_attempt_is_the_earliest_not_before() -> None:
    status = status_of("a@x.test", "b@x.test", "c@x.test")
    results = [
        TransientFailure("a@x.test", LATER, "", not_before=500.0),
        TransientFailure("b@x.test", LATER, "", not_before=300.0),
        TransientFailure("c@x.test", LATER, HOST),
    ]
    assert record(status, results, 100.0).next_attempt == 300.0
    # a later attempt without any wait clears it: the scheduler decides the backoff again
    assert record(record(status, results, 100.0), [results[2]], 400.0).next_attempt is None


def test_record_keeps_other_status_fields() -> None:
    status = DeliveryStatus((RecipientStatus("a@x.test", "pending"),), attempts=4, bounce_sent=True)
    after = record(status, [TransientFailure("a@x.test", LATER, HOST)], 1.0)
    assert after.bounce_sent and after.attempts == 5
