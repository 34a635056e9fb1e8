"""`POST /v1/messages` in raw mode through quart's test client: the real `Submitter` over the in-memory
spool, with a scripted upstream standing in for delivery. Every status code and answer shape, the checks
on each field (header injection, base64, sizes), and what reaches the spool — nothing, on any error."""

from __future__ import annotations

import base64
import json

import pytest
import structlog

from hedwigpy.api import create_app
from hedwigpy.auth import hash_password
from hedwigpy.config import ApiKeyConfig
from hedwigpy.storage import State

from .submit_api import HOST, LOOPBACK, MESSAGE, Api, MiB, assert_problem, raw

pytestmark = pytest.mark.timeout(60)

# --- answers ------------------------------------------------------------------------------------------------


async def test_delivered_is_200_with_each_upstream_reply() -> None:
    api = Api({"bob@example.net": "250 2.6.0 Ok: queued as XYZ"})
    status, headers, body = await api.post(raw(recipients=["ann@example.net", "bob@example.net"]))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == {
        "id": body["id"],
        "status": "delivered",
        "recipients": [
            {
                "address": "ann@example.net",
                "status": "delivered",
                "code": 250,
                "enhanced": "2.0.0",
                "message": f"{HOST}: Ok: accepted",
            },
            {
                "address": "bob@example.net",
                "status": "delivered",
                "code": 250,
                "enhanced": "2.6.0",
                "message": f"{HOST}: Ok: queued as XYZ",
            },
        ],
    }
    assert api.stored() == []  # the upstream has it
    [(message, recipients, content)] = api.upstream.calls
    assert message.id == body["id"] and recipients == ("ann@example.net", "bob@example.net")
    env = message.envelope
    assert (env.sender, env.listener, env.client_addr, env.auth_user) == (
        "app@example.org",
        "http",
        "127.0.0.1:50000",
        None,
    )
    assert (env.body_type, env.smtputf8) == ("7BIT", False)
    # our trace header, then the client's message with a Message-ID added
    assert content.startswith(
        f"Received: from [127.0.0.1]\r\n\tby mx.test.example (hedwigpy) with HTTP id {body['id']};".encode()
    )
    head, _, tail = content.partition(b"\r\n\r\n")
    assert f"Message-ID: <{body['id']}@mx.test.example>".encode() in head
    assert head.endswith(b"Subject: hello\r\nMessage-ID: <" + body["id"].encode() + b"@mx.test.example>")
    assert tail == b"Hello, Ann.\r\n"


async def test_one_recipient_is_named_in_the_trace_header() -> None:
    api = Api()
    assert (await api.post(raw()))[0] == 200
    content = api.upstream.calls[0][2]
    assert content.split(b";", 1)[0].endswith(b"\r\n\tfor <ann@example.net>")


async def test_upstream_450_is_202_and_the_message_is_spooled() -> None:
    api = Api({"ann@example.net": "450 4.2.1 Mailbox busy"})
    status, _, body = await api.post(raw())
    assert status == 202
    assert body == {
        "id": body["id"],
        "status": "queued",
        "recipients": [
            {
                "address": "ann@example.net",
                "status": "queued",
                "code": 250,
                "enhanced": "2.0.0",
                "message": f"Ok: queued as {body['id']}",
            }
        ],
    }
    [(message, content)] = api.stored()
    assert message.id == body["id"] and message.state is State.QUEUED
    assert message.envelope.listener == "http" and message.envelope.recipients == ("ann@example.net",)
    assert content.startswith(b"Received: from [127.0.0.1]") and content.endswith(b"Hello, Ann.\r\n")
    [rcpt] = api.storage.statuses[message.id].recipients
    assert rcpt.state == "pending" and rcpt.last is not None and rcpt.last.code == 450
    assert api.scheduler.stats()["scheduled"] == 1  # handed to the queue


async def test_delivered_and_queued_is_202_and_only_the_rest_is_retried() -> None:
    api = Api({"bob@example.net": "451 4.7.1 Greylisted"})
    status, _, body = await api.post(raw(recipients=["ann@example.net", "bob@example.net"]))
    assert status == 202 and body["status"] == "queued"
    assert [(r["address"], r["status"], r["code"]) for r in body["recipients"]] == [
        ("ann@example.net", "delivered", 250),
        ("bob@example.net", "queued", 250),
    ]
    status_file = api.storage.statuses[body["id"]]
    assert status_file.pending() == ("bob@example.net",)


async def test_refused_recipients_are_final_answers() -> None:
    api = Api({"bob@example.net": "550 5.1.1 No such user"})
    status, _, body = await api.post(raw(recipients=["ann@example.net", "bob@example.net"]))
    assert status == 200 and body["status"] == "partial"
    assert body["recipients"][1] == {
        "address": "bob@example.net",
        "status": "rejected",
        "code": 550,
        "enhanced": "5.1.1",
        "message": f"{HOST}: No such user",
    }
    # a refusal after a delivery is kept: the queue bounces it to the sender
    [(message, _)] = api.stored()
    assert api.storage.statuses[message.id].pending() == ()

    api = Api({"bob@example.net": "550 5.1.1 No such user"})
    status, _, body = await api.post(raw(recipients=["bob@example.net"]))
    assert status == 200 and body["status"] == "rejected"
    assert body["recipients"][0]["code"] == 550 and api.stored() == []


async def test_without_cut_through_everything_is_queued() -> None:
    api = Api(delivery={"cut_through": False})
    status, _, body = await api.post(raw(recipients=["ann@example.net", "bob@example.net"]))
    assert status == 202 and body["status"] == "queued"
    assert {r["status"] for r in body["recipients"]} == {"queued"}
    assert [m.id for m, _ in api.stored()] == [body["id"]] and api.upstream.calls == []


async def test_filters_refuse_recipients_like_smtp() -> None:
    filters = [{"type": "recipient_domain", "domains": ["blocked.example"], "action": "deny"}]
    api = Api(filters=filters)
    status, _, body = await api.post(raw(recipients=["x@blocked.example", "ann@example.net"]))
    assert status == 200 and body["status"] == "partial"
    assert body["recipients"][0] == {
        "address": "x@blocked.example",
        "status": "rejected",
        "code": 550,
        "enhanced": "5.7.1",
        "message": "<x@blocked.example>: Recipient address rejected: domain not allowed",
    }
    [(message, recipients, _)] = api.upstream.calls
    assert recipients == ("ann@example.net",) and message.envelope.recipients == ("ann@example.net",)

    filters = [{"type": "sender_domain", "domains": ["example.org"], "action": "deny"}]
    api = Api(filters=filters)
    status, _, body = await api.post(raw())
    assert status == 200 and body["status"] == "rejected"
    assert (
        body["recipients"][0]["code"] == 550 and "Sender address rejected" in body["recipients"][0]["message"]
    )
    assert api.untouched()


async def test_envelope_flags_and_the_null_sender() -> None:
    api = Api(delivery={"cut_through": False})
    eight_bit = MESSAGE.replace(b"Hello", "Grüße".encode())
    status, _, body = await api.post(raw(sender="", recipients=["jürgen@exämple.net"], content=eight_bit))
    assert status == 202 and body["recipients"][0]["address"] == "jürgen@exämple.net"
    env = api.stored()[0][0].envelope
    assert (env.sender, env.recipients, env.body_type, env.smtputf8) == (
        "",
        ("jürgen@exämple.net",),
        "8BITMIME",
        True,
    )


async def test_addresses_take_angle_brackets_and_display_names_and_duplicates_collapse() -> None:
    api = Api()
    status, _, body = await api.post(
        raw(
            sender='"App, Inc." <app@example.org>',
            recipients=["<ann@EXAMPLE.net>", "ann@example.net", " Bob <bob@example.net> "],
        )
    )
    assert status == 200
    assert [r["address"] for r in body["recipients"]] == ["ann@example.net", "bob@example.net"]
    assert api.upstream.calls[0][0].envelope.sender == "app@example.org"
    assert (await api.post(raw(sender="<>")))[0] == 200
    assert api.upstream.calls[1][0].envelope.sender == ""


async def test_bcc_is_removed_and_bare_lf_is_accepted() -> None:
    api = Api(delivery={"cut_through": False})
    content = b"From: app@example.org\nBcc: secret@example.net\nSubject: lf\n\nbody line\n"
    status, _, body = await api.post(
        raw(recipients=["ann@example.net", "secret@example.net"], content=content)
    )
    assert status == 202
    stored = api.stored()[0][1]
    assert b"secret" not in stored
    assert stored.endswith(
        b"Subject: lf\n" + f"Message-ID: <{body['id']}@mx.test.example>\r\n".encode() + b"\nbody line\n"
    )


async def test_idempotency_key_is_ignored_for_now() -> None:
    api = Api()
    for _ in range(2):
        assert (await api.post(raw(), {"Idempotency-Key": "abc"}))[0] == 200
    assert len(api.upstream.calls) == 2


# --- the request's faults: 400 ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\0", "\x7f", "\t"])
@pytest.mark.parametrize("where", ["envelope_from", "recipients[1]"])
async def test_header_injection_in_addresses_is_400(bad: str, where: str) -> None:
    api = Api()
    evil = f"ann@example.net{bad}Bcc: victim@example.com"
    doc = raw(recipients=["ok@example.net", evil]) if where != "envelope_from" else raw(sender=evil)
    errors = assert_problem(await api.post(doc), 400, [where], where)
    assert "CR, LF, NUL" in errors[0]["detail"]
    assert api.untouched()


async def test_every_field_at_fault_is_listed() -> None:
    api = Api()
    doc = {"envelope_from": 5, "recipients": ["ok@example.net", "not an address", 7, "a@b@c.example"]}
    errors = assert_problem(
        await api.post(doc), 400, ["envelope_from", "recipients[1]", "recipients[2]", "recipients[3]", "raw"]
    )
    assert errors[0]["detail"] == "must be a string"
    assert "Syntax error" in errors[1]["detail"]
    assert errors[4]["detail"].startswith("required")
    assert api.untouched()


@pytest.mark.parametrize(
    ("recipients", "detail"),
    [
        ([], "at least one recipient"),
        ("ann@example.net", "must be a list"),
        (None, "required"),
        ([""], "Empty path"),
        (["Ann <ann@example.net> <x@example.net>"], "Syntax error"),
        (["postmaster"], "Syntax error"),
        ([f"{'a' * 65}@example.net"], "Local part too long"),
        (["a@[300.1.1.1]"], "Bad address literal"),
    ],
)
async def test_bad_recipients_are_400(recipients: object, detail: str) -> None:
    api = Api()
    doc = raw()
    if recipients is None:
        del doc["recipients"]
    else:
        doc["recipients"] = recipients
    field = "recipients" if not isinstance(recipients, list) or not recipients else "recipients[0]"
    errors = assert_problem(await api.post(doc), 400, [field])
    assert detail in errors[0]["detail"]
    assert api.untouched()


async def test_too_many_recipients_is_400() -> None:
    api = Api(limits={"max_recipients": 2})
    doc = raw(recipients=["a@example.net", "b@example.net", "c@example.net"])
    errors = assert_problem(await api.post(doc), 400, ["recipients"])
    assert "at most 2" in errors[0]["detail"]
    assert api.untouched()


@pytest.mark.parametrize(
    "encoded",
    [
        "!!!not base64!!!",
        "SGVsbG8",  # padding missing
        "SGVs bG8=x",
        "SGVsbG8-",  # URL-safe alphabet
        "SGVsbG8=é",
        12,
        "",
    ],
)
async def test_bad_base64_is_400(encoded: object) -> None:
    api = Api()
    doc = raw()
    doc["raw"] = encoded
    errors = assert_problem(await api.post(doc), 400, ["raw"])
    expected = "must be a string" if encoded == 12 else "empty" if encoded == "" else "not valid base64"
    assert expected in errors[0]["detail"]
    assert api.untouched()


async def test_base64_wrapped_in_lines_is_accepted() -> None:
    api = Api()
    doc = raw()
    doc["raw"] = base64.encodebytes(MESSAGE).decode().replace("\n", "\r\n")
    assert (await api.post(doc))[0] == 200
    assert api.upstream.calls[0][2].endswith(MESSAGE[MESSAGE.index(b"\r\n\r\n") :])


async def test_unknown_and_structured_fields_next_to_raw_are_400() -> None:
    api = Api()
    errors = assert_problem(await api.post(raw(subject="hi", priority="high")), 400, ["subject", "priority"])
    assert [e["detail"] for e in errors] == ["not allowed with raw", "unknown field"]
    assert api.untouched()


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'"raw"', b"\xff\xfe{}", b"{" * 100_000, b'{"raw": "a", "raw": "b"}'],
)
async def test_a_body_that_is_not_a_json_object_is_400(body: bytes) -> None:
    api = Api()
    field = "raw" if body.startswith(b'{"raw"') else "(body)"
    assert_problem(await api.post(body), 400, [field])
    assert api.untouched()


async def test_a_body_that_is_not_json_by_its_type_is_415() -> None:
    api = Api()
    answer = await api.post(raw(), {"Content-Type": "application/x-www-form-urlencoded"})
    assert_problem(answer, 415, ["Content-Type"], "application/json")
    assert answer[1]["Connection"] == "close"  # the body was never read: the connection is done
    assert (await api.post(raw(), {"Content-Type": "application/merge-patch+json; charset=utf-8"}))[0] == 200


async def test_a_long_line_is_400() -> None:
    api = Api()
    for content in (MESSAGE + b"x" * 999 + b"\r\n", MESSAGE + b"x" * 999):
        errors = assert_problem(await api.post(raw(content=content)), 400, ["raw"])
        assert "998" in errors[0]["detail"]
    assert api.untouched()
    assert (await api.post(raw(content=MESSAGE + b"x" * 998 + b"\r\n")))[0] == 200


async def test_a_mail_loop_is_400_like_smtp_554() -> None:
    api = Api()
    looped = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 51 + MESSAGE
    errors = assert_problem(await api.post(raw(content=looped)), 400, ["raw"], "5.4.6")
    assert "554 5.4.6" in errors[0]["detail"] and "hops" in errors[0]["detail"]
    assert api.untouched()
    assert (await api.post(raw(content=looped[looped.index(b"\r\n") + 2 :])))[0] == 200  # 50: the limit


# --- sizes: 413 ---------------------------------------------------------------------------------------------


async def test_26_mib_is_413() -> None:
    api = Api()
    answer = await api.post(raw(content=b"x" * (26 * MiB)))
    errors = assert_problem(answer, 413, ["raw"], "the limit is 26214400")
    assert "larger than 26214400 octets" in errors[0]["detail"]
    assert api.untouched()


async def test_over_the_limit_once_decoded_is_413() -> None:
    api = Api(limits={"max_message_size": 4096})
    big = (MESSAGE + (b"y" * 78 + b"\r\n") * 100)[:4097]
    errors = assert_problem(await api.post(raw(content=big)), 413, ["raw"], "4096")
    assert "4096" in errors[0]["detail"]
    assert api.untouched()
    assert (await api.post(raw(content=big[:4096])))[0] == 200


async def test_the_body_limit_follows_max_message_size() -> None:
    api = Api(limits={"max_message_size": 4096})
    assert api.intake.max_body == pytest.approx(4096 * 4 / 3 * 1.04 + MiB, abs=2)
    padding = " " * api.intake.max_body
    body = json.dumps(raw()).replace('{"', "{" + padding + '"', 1).encode()
    assert_problem(await api.post(body), 413, ["(body)"])


# --- the spool cannot accept: 503 ---------------------------------------------------------------------------


async def test_disk_full_is_503_and_nothing_is_queued() -> None:
    api = Api(free_bytes=100)
    answer = await api.post(raw())
    assert_problem(answer, 503, [], "no room")
    assert answer[1]["Retry-After"] == "60"
    assert api.untouched()


@pytest.mark.parametrize("cut_through", [True, False])
async def test_a_spool_write_error_is_503_and_nothing_is_queued(cut_through: bool) -> None:
    api = Api({"ann@example.net": "450 4.2.1 busy"}, delivery={"cut_through": cut_through})
    api.storage.fail_writes = True
    with structlog.testing.capture_logs() as logs:
        assert_problem(await api.post(raw()), 503, [], "nothing was queued")
    assert api.stored() == []
    assert not cut_through or any(e["event"] == "rejected" for e in logs)


async def test_not_ready_is_503() -> None:
    api = Api()
    api.ready = False
    assert_problem(await api.post(raw()), 503, [], "starting or draining")
    assert api.untouched()


async def test_without_an_intake_the_route_is_503() -> None:
    api = Api()
    app = create_app(api.scheduler, lambda: True)
    resp = await app.test_client().post("/v1/messages", json=raw(), scope_base=LOOPBACK)
    assert resp.status_code == 503
    assert "does not accept messages" in (await resp.get_json())["detail"]


# --- 401 and 429 --------------------------------------------------------------------------------------------


async def test_api_keys_401_and_the_key_name_as_auth_user() -> None:
    keys = (ApiKeyConfig("billing", hash_password("s3cret", ln=1)),)
    api = Api(api_keys=keys, delivery={"cut_through": False})
    remote = {"client": ("192.0.2.7", 40000)}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, resp_headers, _ = await api.post(raw(), headers, remote)
        assert status == 401 and resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert api.untouched()
    assert (await api.post(raw(), {"Authorization": "Bearer s3cret"}, remote))[0] == 202
    [(message, content)] = api.stored()
    env = message.envelope
    assert (env.auth_user, env.client_addr) == ("billing", "192.0.2.7:40000")
    assert content.startswith(b"Received: from [192.0.2.7]\r\n")


async def test_per_client_rate_limit_is_429() -> None:
    api = Api(per_client=2)
    assert [(await api.post(raw()))[0] for _ in range(2)] == [200, 200]
    answer = await api.post(raw())
    assert_problem(answer, 429, [], "too much mail")
    assert int(answer[1]["Retry-After"]) >= 1
    assert len(api.upstream.calls) == 2
