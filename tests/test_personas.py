"""Every undocumented choice of the sandbox is a switch, and each value behaves as specified.

The switches live in :class:`Behaviour`; personas name sets of them. These tests talk to the app
in-process through ``httpx.ASGITransport``, with an injected clock wherever time matters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import httpx
import pytest

from allo_batch.sandbox import (
    PERSONAS,
    Behaviour,
    SandboxApp,
    UnknownPersonaError,
    World,
    build_world,
    create_app,
    describe_personas,
    persona,
    serve_sandbox,
)
from allo_batch.sandbox.personas import SWITCH_VALUES
from tests.helpers import SANDBOX_KEY, SandboxFactory

KEY = SANDBOX_KEY
CLASSIC, SHORT = "MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL"
T0 = 1_800_000_000.5  # exactly representable, so window arithmetic in the tests is exact
T1, T2 = "1800000001", "1800000002"  # the next two whole seconds, as X-RateLimit-Reset says them
BATCH_IDS = [f"cll-b{i:02d}" for i in range(20)]


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_world(*, write_rate: int = 1000, read_rate: int = 1000) -> World:
    world = build_world(api_key=KEY, write_rate=write_rate, read_rate=read_rate)
    world.add_call("cll-one", [CLASSIC])
    world.add_call("cll-two", [CLASSIC, SHORT])
    for call_id in BATCH_IDS:
        world.add_call(call_id, [CLASSIC])
    world.sms.add("msg-sms")
    return world


class Api:
    """Synchronous requests to one sandbox app, in-process."""

    def __init__(self, app: SandboxApp) -> None:
        self.app = app

    def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        form: str = "prefixed",
    ) -> httpx.Response:
        auth = {"prefixed": f"Api-Key {KEY}", "bare": KEY}[form]
        all_headers = {"Authorization": auth, **(headers or {})}

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as c:
                return await c.request(method, path, json=json, headers=all_headers)

        return anyio.run(go)

    def patch(
        self, call_id: str, content: str, template: str | None = None, **options: Any
    ) -> httpx.Response:
        body = {"content": content} | ({"template_key": template} if template else {})
        path = f"/v2/api/conversations/items/{call_id}/summary"
        return self.send("PATCH", path, json=body, **options)

    def summary(self, call_id: str) -> Any:
        return self.send("GET", f"/v2/api/conversations/items/{call_id}").json()["data"]["summary"]

    def batch(self, ids: list[str]) -> httpx.Response:
        return self.send("POST", "/v2/api/conversations/items/batch", json={"ids": ids})

    def batch_ids(self, ids: list[str]) -> list[str]:
        return [item["id"] for item in self.batch(ids).json()["data"]]


def api(
    world: World | None = None,
    *,
    clock: Clock | None = None,
    faults: str | None = None,
    seed: int = 0,
    **switches: Any,
) -> Api:
    """An app with the documented persona and these switches changed."""
    behaviour = dataclasses.replace(persona("documented"), **switches)
    app = create_app(
        world or make_world(), persona=behaviour, faults=faults, seed=seed, clock=clock or Clock()
    )
    return Api(app)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


class TestPersonas:
    def test_documented_is_the_default_behaviour(self) -> None:
        """The default persona is the dataclass's defaults, and apps start with it."""
        assert persona("documented") == Behaviour()
        assert SandboxApp(make_world()).behaviour == Behaviour()

    @pytest.mark.parametrize("name", [n for n in PERSONAS if n != "documented"])
    def test_each_other_persona_differs_from_documented_on_every_switch(self, name: str) -> None:
        """A non-default persona takes the other side of every single switch."""
        documented, other = persona("documented").as_dict(), persona(name).as_dict()
        same = [switch for switch in documented if documented[switch] == other[switch]]
        assert same == []

    def test_the_personas_together_cover_every_value_of_every_switch(self) -> None:
        """Across all personas, each switch takes each of its values; some persona lags reads."""
        for switch, values in SWITCH_VALUES.items():
            taken = [getattr(b, switch) for b in PERSONAS.values()]
            assert all(any(t is v or t == v for t in taken) for v in values), switch
        assert {f.name for f in dataclasses.fields(Behaviour)} == {*SWITCH_VALUES, "read_lag"}
        assert any(b.read_lag > 0 for b in PERSONAS.values())

    def test_an_unknown_name_is_a_value_error_naming_the_known_ones(self) -> None:
        """A typo in a persona name is refused with the list of names to choose from."""
        with pytest.raises(UnknownPersonaError) as caught:
            create_app(make_world(), persona="documentd")
        assert isinstance(caught.value, ValueError)
        assert all(name in str(caught.value) for name in PERSONAS)

    def test_a_custom_behaviour_is_checked(self) -> None:
        """Values outside a switch's choices, and negative lags, are refused at once."""
        with pytest.raises(ValueError, match="auth"):
            Behaviour(auth="bearer")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="read_lag"):
            Behaviour(read_lag=-0.1)

    def test_description_lists_every_persona_and_its_switches(self) -> None:
        """The help text names each persona and every switch it sets, in short lines."""
        text = describe_personas()
        assert all(f"{name}:" in text for name in PERSONAS)
        assert all(text.count(f"{switch}=") == len(PERSONAS) for switch in SWITCH_VALUES)
        assert "read_lag=0.5s" in text
        assert all(len(line) <= 79 for line in text.splitlines())

    def test_state_reports_the_persona_and_its_switches(self) -> None:
        """/_sandbox/state names the persona ("custom" for a set of its own) and every switch."""
        named = Api(create_app(make_world(), persona="awkward"))
        state = named.send("GET", "/_sandbox/state").json()
        assert (state["persona"], state["behaviour"]) == ("awkward", persona("awkward").as_dict())
        custom = api(auth="both")
        assert custom.send("GET", "/_sandbox/state").json()["persona"] == "custom"
        # The older batch_bucket argument still works, on top of a persona.
        legacy = create_app(make_world(), batch_bucket="read")
        assert (legacy.batch_bucket, legacy.state()["persona"]) == ("read", "custom")

    def test_a_persona_is_served_over_the_wire(self, sandbox_factory: SandboxFactory) -> None:
        """The running sandbox takes a persona like create_app does."""
        with sandbox_factory(make_world(), api_key=KEY, persona="secondhand") as sandbox:
            assert sandbox.state()["persona"] == "secondhand"
            me = httpx.get(f"{sandbox.base_url}/v2/api/me", headers={"Authorization": KEY})
            assert me.status_code == 200

    def test_serve_sandbox_takes_a_persona(self) -> None:
        """The async serve_sandbox passes its persona to the app it serves."""

        async def go() -> tuple[str, int]:
            served = serve_sandbox(make_world(), api_key=KEY, persona="awkward")
            async with served as running, httpx.AsyncClient(base_url=running.base_url) as c:
                me = await c.get("/v2/api/me", headers={"Authorization": KEY})
                state = (await c.get("/_sandbox/state")).json()
            return state["persona"], me.status_code

        assert anyio.run(go) == ("awkward", 200)


class TestAuth:
    @pytest.mark.parametrize(
        ("accepted", "prefixed", "bare"),
        [("prefixed", 200, 401), ("bare", 401, 200), ("both", 200, 200)],
    )
    def test_only_the_accepted_forms_pass(self, accepted: str, prefixed: int, bare: int) -> None:
        """The wrong form is 401 UNAUTHORIZED; each accepted form reaches the endpoint."""
        sandbox = api(auth=accepted)
        answers = {
            form: sandbox.send("GET", "/v2/api/me", form=form) for form in ("prefixed", "bare")
        }
        assert (answers["prefixed"].status_code, answers["bare"].status_code) == (prefixed, bare)
        for answer in answers.values():
            if answer.status_code == 401:
                assert error_of(answer)["code"] == "UNAUTHORIZED"

    def test_the_bare_key_fallback_costs_exactly_one_request(self) -> None:
        """Counters show per route and per form what a client sent: one refusal, one success."""
        sandbox = api(auth="bare")
        assert sandbox.send("GET", "/v2/api/me").status_code == 401
        assert sandbox.send("GET", "/v2/api/me", form="bare").status_code == 200
        counters = sandbox.app.state()["counters"]
        assert {k: counters[k] for k in ("me", "unauthorized", "auth_prefixed", "auth_bare")} == {
            "me": 2,
            "unauthorized": 1,
            "auth_prefixed": 1,
            "auth_bare": 1,
        }

    def test_a_bare_key_is_still_checked(self) -> None:
        """Under the bare form an unknown key is API_KEY_INVALID, a revoked one API_KEY_REVOKED."""
        sandbox = api(auth="bare")

        def code_for(value: str) -> str:
            answer = sandbox.send("GET", "/v2/api/me", headers={"Authorization": value})
            return str(error_of(answer)["code"])

        assert code_for("ak_nope") == "API_KEY_INVALID"
        assert code_for(f"Bearer {KEY}") == "UNAUTHORIZED"
        sandbox.app.world.revoked.add(KEY)
        assert code_for(KEY) == "API_KEY_REVOKED"


def rate_headers(response: httpx.Response) -> tuple[str, str, str]:
    h = response.headers
    return h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"], h["X-RateLimit-Reset"]


class TestWindow:
    def test_fixed_windows_admit_a_full_budget_on_each_side_of_a_second(self) -> None:
        """Fixed: 2 at x.75 and 2 more at (x+1).0, each window with its own Reset."""
        clock = Clock(T0 + 0.25)
        sandbox = api(make_world(write_rate=2), clock=clock, window="fixed")
        late = [sandbox.patch("cll-one", str(i)) for i in range(3)]
        clock.now = T0 + 0.5
        early = [sandbox.patch("cll-one", str(i)) for i in range(3)]
        assert [a.status_code for a in late + early] == [200, 200, 429, 200, 200, 429]
        assert [rate_headers(a)[1:] for a in late] == [("1", T1), ("0", T1), ("0", T1)]
        assert rate_headers(early[0]) == ("2", "1", T2)

    def test_sliding_window_counts_the_last_second(self) -> None:
        """Sliding: a slot frees exactly 1.0 s after the request that took it; Reset says when."""
        clock = Clock(T0)  # x.5
        sandbox = api(make_world(write_rate=2), clock=clock, window="sliding")
        first = sandbox.patch("cll-one", "a")
        clock.now = T0 + 0.25
        second = sandbox.patch("cll-one", "b")
        refused = sandbox.patch("cll-one", "c")
        assert [a.status_code for a in (first, second, refused)] == [200, 200, 429]
        # The oldest counted request (at x.5) leaves the window at (x+1).5: Reset rounds up.
        assert rate_headers(first) == ("2", "1", T2)
        assert rate_headers(refused) == ("2", "0", T2)
        assert refused.headers["Retry-After"] == "1"
        clock.now = T0 + 0.5  # a new whole second, where a fixed window would admit
        assert sandbox.patch("cll-one", "d").status_code == 429
        clock.now = T0 + 1.0  # the first request has left the window, the second has not
        freed = sandbox.patch("cll-one", "e")
        assert (freed.status_code, rate_headers(freed)) == (200, ("2", "0", T2))
        assert sandbox.patch("cll-one", "f").status_code == 429


class TestBatchBucket:
    @pytest.mark.parametrize(("bucket", "second"), [("write", 429), ("read", 200)])
    def test_the_batch_read_spends_the_chosen_budget(self, bucket: str, second: int) -> None:
        """With one write a second, a second batch read is refused only on the write budget."""
        sandbox = api(make_world(write_rate=1, read_rate=100), batch_bucket=bucket)
        answers = [sandbox.batch(["cll-one"]) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, second]
        assert answers[0].headers["X-RateLimit-Limit"] == {"write": "1", "read": "100"}[bucket]

    def test_the_constructor_argument_overrides_the_persona(self) -> None:
        """create_app(batch_bucket=...) still decides, whatever the persona says."""
        app = create_app(make_world(write_rate=1), persona="documented", batch_bucket="read")
        sandbox = Api(app)
        assert [sandbox.batch(["cll-one"]).status_code for _ in range(2)] == [200, 200]


class TestRetryAfter:
    @pytest.mark.parametrize(
        ("where", "header", "body"),
        [("header", True, False), ("body", False, True), ("both", True, True)],
    )
    def test_a_429_says_how_long_where_chosen(self, where: str, header: bool, body: bool) -> None:
        """Retry-After and retry_after_seconds appear exactly where the switch puts them."""
        sandbox = api(make_world(write_rate=1), retry_after=where)
        sandbox.patch("cll-one", "a")
        refused = sandbox.patch("cll-one", "b")
        error = error_of(refused)
        assert (refused.status_code, error["retryable"]) == (429, True)
        assert ("Retry-After" in refused.headers, "retry_after_seconds" in error) == (header, body)
        if header:
            assert refused.headers["Retry-After"] == "1"
        if body:
            assert error["retry_after_seconds"] == 1


class TestRetryable500:
    @pytest.mark.parametrize("flag", [True, False, None])
    def test_the_500_envelope_carries_the_chosen_flag(self, flag: bool | None) -> None:
        """retryable is true, false, or left out of the 500 envelope."""
        sandbox = api(faults="500=1", retryable_500=flag)
        answer = sandbox.patch("cll-one", "x")
        error = error_of(answer)
        assert (answer.status_code, error["code"]) == (500, "INTERNAL_SERVER_ERROR")
        assert error.get("retryable", "absent") == ("absent" if flag is None else flag)
        assert sandbox.app.state(written_only=True)["summaries"] == []


class TestGateway:
    @pytest.mark.parametrize("status", [502, 503, 504])
    def test_html_pages(self, status: int) -> None:
        """html: the gateway answers a non-JSON page with its status."""
        answer = api(faults=f"{status}=1", gateway="html").patch("cll-one", "x")
        assert answer.status_code == status
        assert answer.headers["content-type"] == "text/html"
        assert answer.text.startswith("<html>")

    @pytest.mark.parametrize(
        ("status", "code"),
        [(502, "BAD_GATEWAY"), (503, "SERVICE_UNAVAILABLE"), (504, "GATEWAY_TIMEOUT")],
    )
    def test_envelopes(self, status: int, code: str) -> None:
        """envelope: the v2 JSON error envelope, a retryable server_error."""
        sandbox = api(faults=f"{status}=1", gateway="envelope")
        answer = sandbox.patch("cll-one", "x")
        error = error_of(answer)
        assert answer.status_code == status
        assert (error["type"], error["code"], error["retryable"]) == ("server_error", code, True)
        assert error["request_id"].startswith("req_")
        assert sandbox.app.state(written_only=True)["summaries"] == []


class TestIdenticalPatch:
    @pytest.mark.parametrize(("bumps", "versions"), [(True, [2, 3, 4]), (False, [2, 2, 3])])
    def test_identical_content_bumps_the_version_or_not(
        self, bumps: bool, versions: list[int]
    ) -> None:
        """Both answer 200 with the version; without a bump, updated_at stays too."""
        clock = Clock()
        sandbox = api(clock=clock, identical_bumps_version=bumps)
        answers = []
        for content in ("same", "same", "other"):
            answers.append(sandbox.patch("cll-one", content))
            clock.now += 2
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json()["data"]["version"] for a in answers] == versions
        first, repeat = (a.json()["data"]["updated_at"] for a in answers[:2])
        assert (first == repeat) is not bumps


class TestReadLag:
    def test_no_lag_shows_a_write_at_once(self) -> None:
        """read_lag=0: the next read shows the new summary."""
        sandbox = api(read_lag=0.0)
        sandbox.patch("cll-one", "# New")
        assert sandbox.summary("cll-one") == "# New"

    def test_reads_show_the_summary_as_it_was_read_lag_ago(self) -> None:
        """read_lag=0.5: GET item and the batch read trail each write by half a second."""
        clock = Clock()
        sandbox = api(clock=clock, read_lag=0.5)
        initial = sandbox.summary("cll-one")
        sandbox.patch("cll-one", "first")
        clock.now += 0.25
        sandbox.patch("cll-one", "second")
        assert sandbox.summary("cll-one") == initial
        clock.now += 0.25
        assert sandbox.summary("cll-one") == "first"
        assert sandbox.batch(["cll-one"]).json()["data"][0]["summary"] == "first"
        clock.now += 0.25
        assert sandbox.summary("cll-one") == "second"
        assert sandbox.batch(["cll-one"]).json()["data"][0]["summary"] == "second"

    def test_history_stays_short(self) -> None:
        """Only what a lagged read can still show is kept, however many writes there were."""
        clock = Clock()
        sandbox = api(clock=clock, read_lag=0.5)
        for i in range(100):
            sandbox.patch("cll-one", f"v{i}")
            clock.now += 0.125
        assert sandbox.summary("cll-one") == "v96"  # written at T0 + 12.0, half a second ago
        assert len(sandbox.app._history[("cll-one", CLASSIC)]) <= 6


class TestTwoTemplateRead:
    @pytest.mark.parametrize(("choice", "shown"), [("classic", "old"), ("short", "new")])
    def test_a_fixed_template_is_shown(self, choice: str, shown: str) -> None:
        """classic / short: the read's summary is that template's text, whichever was written."""
        sandbox = api(two_template_read=choice)
        initial = sandbox.summary("cll-two")
        sandbox.patch("cll-two", "# Short", SHORT)
        assert sandbox.summary("cll-two") == {"old": initial, "new": "# Short"}[shown]

    def test_latest_shows_the_most_recently_written(self) -> None:
        """latest: whichever template was written last; classic before any write."""
        clock = Clock()
        sandbox = api(clock=clock, two_template_read="latest")
        assert sandbox.summary("cll-two") == "# AI summary of cll-two\n"
        sandbox.patch("cll-two", "# Short", SHORT)
        clock.now += 1
        assert sandbox.summary("cll-two") == "# Short"
        sandbox.patch("cll-two", "# Classic", CLASSIC)
        clock.now += 1
        assert sandbox.summary("cll-two") == "# Classic"

    @pytest.mark.parametrize("choice", ["classic", "short", "latest"])
    def test_a_single_template_is_always_shown(self, choice: str) -> None:
        """The switch matters only for calls with two completed templates."""
        sandbox = api(two_template_read=choice)
        sandbox.patch("cll-one", "# Only")
        assert sandbox.summary("cll-one") == "# Only"


class TestBatchShape:
    def test_input_order(self) -> None:
        """input: items come in the order of ids."""
        ids = list(reversed(BATCH_IDS))
        assert api(batch_order="input").batch_ids(ids) == ids

    def test_shuffled_order_is_seeded(self) -> None:
        """shuffled: the same items in another order, the same for the same seed and request."""
        first = api(batch_order="shuffled", seed=1).batch_ids(BATCH_IDS)
        assert sorted(first) == BATCH_IDS
        assert first != BATCH_IDS
        assert api(batch_order="shuffled", seed=1).batch_ids(BATCH_IDS) == first
        assert api(batch_order="shuffled", seed=2).batch_ids(BATCH_IDS) != first

    def test_missing_ids_are_omitted(self) -> None:
        """omit: unknown and bad-prefix ids are left out silently."""
        sandbox = api(batch_missing="omit")
        assert sandbox.batch_ids(["cll-one", "cll-nope", "xyz-1", "msg-sms"]) == [
            "cll-one",
            "msg-sms",
        ]

    @pytest.mark.parametrize(
        ("ids", "status", "code"),
        [
            (["cll-one", "cll-nope"], 404, "CONVERSATION_ITEM_NOT_FOUND"),
            (["cll-one", "xyz-1"], 400, "INVALID_ITEM_ID"),
            (["cll-nope", "xyz-1"], 400, "INVALID_ITEM_ID"),
        ],
    )
    def test_missing_ids_fail_the_whole_request(
        self, ids: list[str], status: int, code: str
    ) -> None:
        """error: the request is refused with param ids; a bad prefix outranks a missing id."""
        answer = api(batch_missing="error").batch(ids)
        error = error_of(answer)
        assert (answer.status_code, error["code"], error["param"]) == (status, code, "ids")

    @pytest.mark.parametrize(("mode", "count"), [("once", 1), ("repeat", 3)])
    def test_duplicate_ids(self, mode: str, count: int) -> None:
        """once: a repeated id gives one item; repeat: one per occurrence."""
        ids = api(batch_duplicates=mode).batch_ids(["cll-one", "msg-sms", "cll-one", "cll-one"])
        assert ids.count("cll-one") == count
        assert ids.count("msg-sms") == 1


class TestIdempotency:
    @staticmethod
    def send(sandbox: Api, content: str, key: str | None = "idem-1") -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return sandbox.patch("cll-one", content, headers=headers)

    @staticmethod
    def writes(sandbox: Api) -> int:
        [one] = sandbox.app.state(written_only=True)["summaries"]
        return int(one["writes"])

    def test_ignore_applies_every_request(self) -> None:
        """ignore: the header changes nothing; a repeat is applied again."""
        sandbox = api(idempotency="ignore")
        answers = [self.send(sandbox, "x") for _ in range(2)]
        assert [a.json()["data"]["version"] for a in answers] == [2, 3]
        assert "Idempotency-Replayed" not in answers[1].headers

    def test_honour_replays_a_repeat_within_the_hour(self) -> None:
        """honour: same key and body → the stored 200 again, not applied, marked as replayed."""
        clock = Clock()
        sandbox = api(clock=clock, idempotency="honour")
        first = self.send(sandbox, "x")
        clock.now += 3599
        again = self.send(sandbox, "x")
        assert (again.status_code, again.json()) == (200, first.json())
        assert again.headers["Idempotency-Replayed"] == "true"
        assert "Idempotency-Replayed" not in first.headers
        assert self.writes(sandbox) == 1
        clock.now += 2  # past the hour the key is forgotten
        assert self.send(sandbox, "x").json()["data"]["version"] == 3

    def test_honour_refuses_a_key_reused_for_another_body(self) -> None:
        """honour: same key, different body → 409 IDEMPOTENCY_KEY_REUSE, nothing applied."""
        sandbox = api(idempotency="honour")
        self.send(sandbox, "x")
        reused = self.send(sandbox, "y")
        error = error_of(reused)
        assert (reused.status_code, error["type"], error["code"]) == (
            409,
            "conflict_error",
            "IDEMPOTENCY_KEY_REUSE",
        )
        assert self.writes(sandbox) == 1

    def test_honour_keeps_keys_of_failed_requests_free(self) -> None:
        """honour: only a success is stored, so a refused request's key can be used again."""
        sandbox = api(idempotency="honour")
        refused = sandbox.patch("cll-one", "x", SHORT, headers={"Idempotency-Key": "k"})
        assert refused.status_code == 404
        assert self.send(sandbox, "x", key="k").status_code == 200

    def test_refuse_rejects_the_header(self) -> None:
        """refuse: any Idempotency-Key is a 400 naming the header; without it the PATCH works."""
        sandbox = api(idempotency="refuse")
        refused = self.send(sandbox, "x")
        error = error_of(refused)
        assert (refused.status_code, error["type"], error["code"], error["param"]) == (
            400,
            "validation_error",
            "INVALID_REQUEST_BODY",
            "Idempotency-Key",
        )
        assert sandbox.app.state(written_only=True)["summaries"] == []
        assert self.send(sandbox, "x", key=None).status_code == 200
        assert self.writes(sandbox) == 1
