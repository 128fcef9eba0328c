"""POST /ingest with an Idempotency-Key: retries are answered again, never counted twice."""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any

import pytest

from tests.conftest import Server
from tests.statsd_server.test_durability import lines_for, totals


def post(server: Server, body: bytes, key: str | None) -> tuple[int, dict[str, Any], str | None]:
    """(status, JSON body, Idempotent-Replayed header)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    headers = {"Content-Type": "text/plain"}
    if key is not None:
        headers["Idempotency-Key"] = key
    conn.request("POST", "/ingest", body, headers)
    resp = conn.getresponse()
    result = resp.status, json.loads(resp.read()), resp.getheader("Idempotent-Replayed")
    conn.close()
    return result


@pytest.mark.slow
def test_retry_with_the_same_key_is_counted_once_even_after_a_restart(
    server_factory: Any,
) -> None:
    """Same key and body: the first summary again; another body: 422; kept across restarts."""
    server: Server = server_factory(shards=2)
    body = lines_for("idem", 40) + b"garbage\n"
    first = post(server, body, "batch-0001")
    assert first[0] == 200 and first[1]["accepted"] == 40 and first[2] is None
    again = post(server, body, "batch-0001")
    assert again[:2] == first[:2] and again[2] == "true"
    other = post(server, lines_for("idem", 5), "batch-0001")
    assert other[0] == 422 and "batch-0001" in other[1]["error"]
    assert post(server, lines_for("idem", 5), "batch-0002")[1]["accepted"] == 5
    assert post(server, lines_for("idem", 5), None)[1]["accepted"] == 5  # no key: counted
    assert totals(server, ["idem"]) == {"idem": 50}

    server.stop()
    restarted = Server(data_dir=server.data_dir, shards=2).start()
    try:
        replay = post(restarted, body, "batch-0001")
        assert replay[:2] == first[:2] and replay[2] == "true"
        assert totals(restarted, ["idem"]) == {"idem": 50}
    finally:
        restarted.stop()


@pytest.mark.slow
def test_concurrent_duplicates_are_counted_once(server_factory: Any) -> None:
    """Eight clients sending the same keyed batch at once, to two fronts: applied once, all
    get its summary."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    body = lines_for("dup", 20_000)
    results: list[tuple[int, dict[str, Any], str | None]] = []

    def send() -> None:
        results.append(post(server, body, "same-key"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[:2] for r in results] == [
        (200, {"accepted": 20_000, "rejected": 0, "rejected_by_reason": {}})
    ] * 8
    assert sorted(r[2] or "" for r in results) == [""] + ["true"] * 7
    assert totals(server, ["dup"]) == {"dup": 20_000}


def test_an_invalid_key_is_refused(server_factory: Any) -> None:
    """Keys are 1-255 visible ASCII characters; anything else is a 400 and nothing counts."""
    server: Server = server_factory(shards=1)
    status, body, _ = post(server, lines_for("badkey", 3), "x" * 256)
    assert status == 400 and "Idempotency-Key" in body["error"]
    status, body, _ = post(server, lines_for("badkey", 3), "has space")
    assert status == 400
    assert totals(server, ["badkey"]) == {"badkey": 0}
