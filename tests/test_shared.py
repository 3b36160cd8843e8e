"""The homes of the shared state: one process, a SQLite file, a real redis-server.

Each "process" of a home is a separate instance (its own owner id, its own connection), and the
atomicity tests run real interpreters side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from polars_llm import shared as shared_module
from polars_llm.errors import ConfigError
from polars_llm.settings import Settings
from polars_llm.shared import (
    FIRST_WINDOW,
    WINDOW_GROWTH,
    ClaimGate,
    InProcessState,
    Meeting,
    RedisState,
    SharedState,
    SharedStateError,
    SqliteState,
    claim_or_find,
    open_shared,
    scope_for,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout=60)

    return asyncio.run(bounded())


@pytest.fixture(params=["sqlite", "redis"])
def make_home(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SharedState]:
    """A factory of homes that share one state, as separate processes would."""
    if request.param == "sqlite":
        return lambda: SqliteState(tmp_path / "shared.sqlite3")
    url = request.getfixturevalue("redis_url")
    return lambda: RedisState(url)


async def closing(*homes: SharedState) -> None:
    for home in homes:
        await home.aclose()


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------
def test_scope_never_shows_the_api_key() -> None:
    """A budget's scope names endpoint and model, and only a hash of the key."""
    scope = scope_for("https://api.example/v1", "sk-secret-123", "gpt-x")
    assert "sk-secret-123" not in scope
    assert scope.startswith("https://api.example/v1|") and scope.endswith("|gpt-x")
    assert scope != scope_for("https://api.example/v1", "sk-other", "gpt-x")


def test_reservations_follow_one_another(make_home: Callable[[], SharedState]) -> None:
    """A second process's budget starts where the first one's ends, not at the same time."""

    async def main() -> tuple[float, float, float]:
        a, b = make_home(), make_home()
        first = await a.reserve("s", 100.0)
        second = await b.reserve("s", 100.0)
        spoken_for = await a.reserve("s", 0.0)
        await closing(a, b)
        return first, second, spoken_for

    first, second, spoken_for = run(main)
    assert first == pytest.approx(0.0, abs=1.0)
    assert 99.0 < second <= 100.0
    assert 199.0 < spoken_for <= 200.0


def test_scopes_have_separate_budgets(make_home: Callable[[], SharedState]) -> None:
    """Budget taken for one endpoint and model leaves another's untouched."""

    async def main() -> float:
        home = make_home()
        await home.reserve("one", 100.0)
        wait = await home.reserve("two", 100.0)
        await home.aclose()
        return wait

    assert run(main) == pytest.approx(0.0, abs=1.0)


def test_pause_holds_every_process_back(make_home: Callable[[], SharedState]) -> None:
    """A 429's pause taken by one process is the wait the next process is told."""

    async def main() -> tuple[float, float]:
        a, b = make_home(), make_home()
        await a.pause("s", 50.0)
        wait = await b.reserve("s", 1.0)
        await a.pause("s", 5.0)  # a shorter pause never shortens a longer one
        after = await b.reserve("s", 0.0)
        await closing(a, b)
        return wait, after

    wait, after = run(main)
    assert 49.0 < wait <= 50.0
    assert 50.0 < after <= 51.0


def test_idle_budget_does_not_pile_up(make_home: Callable[[], SharedState]) -> None:
    """Budget left unused in the past is not handed out later as a burst."""

    async def main() -> list[float]:
        home = make_home()
        await home.reserve("s", 0.001)
        await asyncio.sleep(0.05)
        waits = [await home.reserve("s", 10.0), await home.reserve("s", 10.0)]
        await home.aclose()
        return waits

    first, second = run(main)
    assert first == pytest.approx(0.0, abs=1.0)
    assert 9.0 < second <= 10.0


_RESERVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from polars_llm.shared import RedisState, SqliteState

    kind, where, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        home = RedisState(where) if kind == "redis" else SqliteState(where)
        starts = []
        for _ in range(count):
            # The home measured "now" somewhere between these two clock reads.
            before = time.time()
            wait = await home.reserve("s", 1.0)
            starts.append([before + wait, time.time() + wait])
        await home.aclose()
        print(json.dumps(starts))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_processes_racing_never_get_the_same_budget(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Four interpreters taking budget at once get 80 one-second spans that do not overlap."""
    where = request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path / "s.sqlite3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESERVER, kind, where, "20"],
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(4)
    ]
    starts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        starts += json.loads(out)
    starts.sort()
    assert len(starts) == 80
    # Each one-second span starts where the one before ended. A span's start is known between
    # two clock reads around its round trip (a loaded machine may stall a process between
    # them), so spans are compared by what they surely cover: a double-booked second would
    # still overlap by about a whole second, a stall cannot make one seem to.
    overlaps = [(prev[0] + 1.0) - nxt[1] for prev, nxt in itertools.pairwise(starts)]
    assert max(overlaps) < 0.5
    slack = max(late - early for early, late in starts)
    assert starts[-1][0] + 1.0 - starts[0][0] == pytest.approx(80.0, abs=1.0 + slack)


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------
def test_a_claim_is_held_by_one_process(make_home: Callable[[], SharedState]) -> None:
    """While one process holds a claim, another's fails; the holder may renew it."""

    async def main() -> list[bool]:
        a, b = make_home(), make_home()
        results = [
            await a.claim("k", 60.0),
            await b.claim("k", 60.0),
            await a.claim("k", 60.0),  # renewal
            await b.claim("other", 60.0),
        ]
        await closing(a, b)
        return results

    assert run(main) == [True, False, True, True]


def test_a_released_claim_is_free(make_home: Callable[[], SharedState]) -> None:
    """After its holder releases a claim, another process gets it; a stranger cannot release it."""

    async def main() -> list[bool]:
        a, b = make_home(), make_home()
        await a.claim("k", 60.0)
        await b.release("k")  # not b's: nothing happens
        held = not await b.claim("k", 60.0)
        await a.release("k")
        results = [held, await b.claim("k", 60.0)]
        await closing(a, b)
        return results

    assert run(main) == [True, True]


def test_a_claim_expires(make_home: Callable[[], SharedState]) -> None:
    """A claim nobody renews is free once its lease runs out."""

    async def main() -> bool:
        a, b = make_home(), make_home()
        await a.claim("k", 0.2)
        while not await b.claim("k", 60.0):
            await asyncio.sleep(0.05)
        taken_back = await a.claim("k", 60.0)
        await closing(a, b)
        return taken_back

    assert run(main) is False


def test_claims_in_bulk_are_claims_one_by_one(make_home: Callable[[], SharedState]) -> None:
    """``claim_many`` and ``release_many`` do what ``claim`` and ``release`` do for each key."""

    async def main() -> list[list[bool]]:
        a, b = make_home(), make_home()
        results = [
            await a.claim_many(["k1", "k2"], 60.0),
            await b.claim_many(["k1", "k2", "k3"], 60.0),
            await a.claim_many(["k1", "k3"], 60.0),  # a renews k1; k3 is b's
        ]
        await a.release_many(["k1", "k3"])  # k3 is not a's: nothing happens to it
        results.append(await b.claim_many(["k1", "k3"], 60.0))
        await closing(a, b)
        return results

    assert run(main) == [[True, True], [False, False, True], [True, False], [True, True]]


def test_a_home_tells_who_else_is_there_and_the_limits_stated(
    make_home: Callable[[], SharedState],
) -> None:
    """The first process to meet a SQLite home is alone there (Redis cannot tell, so others may
    always be there); limits one process learned are told to the next."""

    async def main() -> tuple[Meeting, Meeting]:
        a, b = make_home(), make_home()
        first = await a.meet("scope")
        await a.learn("scope", 1200, None)
        await a.learn("scope", None, 90_000)
        second = await b.meet("scope")
        await closing(a, b)
        return first, second

    first, second = run(main)
    assert first.rpm is None and first.tpm is None
    assert first.others is isinstance(make_home(), RedisState)
    assert second == Meeting(True, 1200, 90_000)


def test_a_process_that_has_gone_is_not_there(tmp_path: Path) -> None:
    """A process that met the SQLite home and exited does not count as another one there."""
    path = tmp_path / "shared.sqlite3"
    script = (
        "import asyncio; from polars_llm.shared import SqliteState; "
        f"print(asyncio.run(SqliteState({str(path)!r}).meet('s')).others)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr

    async def meet() -> Meeting:
        home = SqliteState(path)
        met = await home.meet("s")
        await home.aclose()
        return met

    assert run(meet).others is False


def test_claim_of_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    """On one machine, a claim whose process was killed (kill -9) is free before it expires."""
    path = tmp_path / "shared.sqlite3"
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from polars_llm.shared import SqliteState

        async def main():
            home = SqliteState({str(path)!r})
            assert await home.claim("k", 3600.0)
            print("claimed", flush=True)
            time.sleep(3600)

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"claimed"

    async def try_claim() -> bool:
        home = SqliteState(path)
        got = await home.claim("k", 60.0)
        await home.aclose()
        return got

    held_while_alive = not run(try_claim)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert held_while_alive
    assert run(try_claim)


def _claimed_in_file(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sorted(key for (key,) in db.execute("SELECT key FROM claims"))


def test_a_process_alone_keeps_its_claims_in_memory_until_another_arrives(tmp_path: Path) -> None:
    """Alone on a SQLite file, a process claims without writing claims to the file. A second
    process that arrives waits until the first has written its live claims there (the first
    looks for newcomers every SOLO_POLL seconds), then finds them held; from then on both claim
    through the file, and a claim the first released while alone is free."""
    path = tmp_path / "shared.sqlite3"

    async def main() -> tuple[list[bool], list[str], list[bool], list[str], list[bool]]:
        a, b = SqliteState(path), SqliteState(path)
        taken = await a.claim_many(["k1", "k2", "k3"], 60.0)
        await a.release("k3")
        while_alone = _claimed_in_file(path)
        got = await b.claim_many(["k1", "k2", "k3", "k4"], 60.0)
        after = _claimed_in_file(path)
        then = await a.claim_many(["k4", "k5"], 60.0)  # b holds k4 now
        await closing(a, b)
        return taken, while_alone, got, after, then

    taken, while_alone, got, after, then = run(main)
    assert taken == [True, True, True]
    assert while_alone == []
    assert got == [False, False, True, True]
    assert after == ["k1", "k2", "k3", "k4"]
    assert then == [False, True]


def test_a_lone_process_that_holds_no_claim_stops_being_alone_until_its_next_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its claims have expired and SOLO_IDLE has passed, a lone process deletes its solo row
    and its watcher thread ends (an idle process costs nothing); its next claim makes it alone
    again."""
    path = tmp_path / "shared.sqlite3"
    monkeypatch.setattr(shared_module, "SOLO_IDLE", 0.1)

    def lone_rows() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT count(*) FROM solo").fetchone()[0])

    async def main() -> list[int]:
        home = SqliteState(path)

        def watching() -> int:
            return int(home._watcher is not None and home._watcher.is_alive())

        await home.claim("k", 0.1)
        seen = [lone_rows(), watching()]
        while lone_rows():  # the run's timeout fails the test if it never ends
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        seen += [watching()]
        await home.claim("k2", 60.0)
        seen += [lone_rows(), watching()]
        await home.aclose()
        return seen

    assert run(main) == [1, 1, 0, 1, 1]


def test_a_lone_process_that_stops_looking_holds_a_newcomer_back_for_solo_wait_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process alive but hung (it keeps claims in memory and no longer looks for newcomers)
    holds a newcomer back for SOLO_WAIT seconds, then loses its claims, as an expired lease
    would; back from its hang, it does not take them back. A lone process that has gone holds
    nobody back."""
    path = tmp_path / "shared.sqlite3"
    monkeypatch.setattr(shared_module, "SOLO_WAIT", 0.3)

    async def main() -> tuple[bool, list[str], bool, bool]:
        hung = SqliteState(path)
        assert await hung.claim("k", 60.0)
        hung._solo_stop.set()  # its watcher stops looking: as if the process hung
        newcomer = SqliteState(path)
        got = await newcomer.claim("k", 60.0)
        with contextlib.closing(sqlite3.connect(path)) as db:
            lone = [owner for (owner,) in db.execute("SELECT owner FROM solo")]
            # A lone process that has gone (a pid no process has): nobody waits for it.
            db.execute("INSERT INTO presence VALUES ('999999999:gone', 0)")
            db.execute("INSERT INTO solo VALUES ('999999999:gone', 0)")
            db.commit()
        await closing(hung)  # back from its hang: it writes down its claims, but not over ours
        kept = await newcomer.claim("k", 60.0)
        monkeypatch.setattr(shared_module, "SOLO_WAIT", 3600.0)  # run() would time out first
        last = await SqliteState(path).claim("z", 60.0)
        await closing(newcomer)
        return got, lone, kept, last

    got, lone, kept, last = run(main)
    assert got is True
    assert lone == []
    assert kept is True
    assert last is True


# --------------------------------------------------------------------------------------------
# Answers, homes, failures
# --------------------------------------------------------------------------------------------
def test_redis_holds_answers_for_every_process(redis_url: str) -> None:
    """An answer one process stores is found by another; a missing one is None."""

    async def main() -> list[str | None]:
        a, b = RedisState(redis_url), RedisState(redis_url)
        await a.put_answer("k1", '{"text": "hi"}')
        found = await b.get_answers(["k1", "k2"])
        await closing(a, b)
        return found

    assert run(main) == ['{"text": "hi"}', None]


def test_answers_paid_while_shared_over_redis_count_as_paid(tmp_path: Path, redis_url: str) -> None:
    """A process that shares its answers over Redis counts each prompt it paid for as paid:
    rows with the same prompt that start while the answer is being shared join its call, not
    the answer already put in the cache (which they would count as served from it)."""
    import polars as pl

    from polars_llm import Step, pipeline
    from polars_llm.pipeline import PipelineStats
    from polars_llm.testing import FakeServer

    texts = [f"t{(i * 7) % 40}" for i in range(303)]  # 40 prompts, each on several rows
    stats = PipelineStats()
    with FakeServer() as server:
        settings = Settings(
            base_url=server.base_url,
            api_key="k",
            cache_dir=tmp_path / "cache",
            shared_url=redis_url,
            progress=False,
        )
        pipeline(
            pl.DataFrame({"text": texts}), [Step("a", "Q {text}")], settings=settings, stats=stats
        )
        calls = server.stats().calls
    step = stats.steps["a"]
    assert calls == 40
    assert (step.requests, step.cached, step.answers) == (40, 0, 303)
    assert step.cached_prompt_tokens == 0 and step.prompt_tokens > 0


def test_in_process_home_keeps_budget_and_holds_no_answers() -> None:
    """The in-process home spaces budget like the others and keeps no answers."""

    async def main() -> tuple[float, list[str | None], bool]:
        home = InProcessState()
        await home.reserve("s", 100.0)
        wait = await home.reserve("s", 1.0)
        await home.put_answer("k", "{}")
        return wait, await home.get_answers(["k"]), await home.claim("k", 1.0)

    wait, answers, claimed = run(main)
    assert 99.0 < wait <= 100.0
    assert answers == [None]
    assert claimed


def test_open_shared_picks_the_home_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A shared URL means Redis; else the cache folder's SQLite file; else this process."""
    assert isinstance(open_shared(Settings(cache=False)), InProcessState)
    sqlite = open_shared(Settings(cache_dir=tmp_path / "c"))
    assert isinstance(sqlite, SqliteState) and sqlite.path.parent == (tmp_path / "c").resolve()
    assert open_shared(Settings(cache_dir=tmp_path / "c")) is sqlite
    assert isinstance(open_shared(Settings(shared_url=redis_url)), RedisState)
    monkeypatch.setenv("POLARS_LLM_SHARED_URL", redis_url)
    assert isinstance(open_shared(Settings(cache_dir=tmp_path / "c")), RedisState)


def test_a_shared_url_that_is_not_redis_is_refused() -> None:
    """An http:// shared URL is refused with a line that shows the expected form."""
    with pytest.raises(ConfigError, match=r"redis://host:6379/0"):
        RedisState("http://localhost:6379")


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    """A Redis server that is not there gives our error, naming the URL and what to check."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        home = RedisState(f"redis://127.0.0.1:{port}/0")
        try:
            await home.reserve("s", 1.0)
        finally:
            await home.aclose()

    with pytest.raises(SharedStateError, match=rf"127\.0\.0\.1:{port}.*Redis server is up"):
        run(main)


def test_unwritable_sqlite_home_is_a_clear_error(tmp_path: Path) -> None:
    """A shared-state file that cannot be created gives our error, not sqlite3's traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    async def main() -> None:
        home = SqliteState(blocker / "shared.sqlite3")
        try:
            await home.reserve("s", 1.0)
        finally:
            await home.aclose()

    with pytest.raises(SharedStateError, match=r"cache folder is writable"):
        run(main)


# --------------------------------------------------------------------------------------------
# Claims around a paid call
# --------------------------------------------------------------------------------------------
@pytest.fixture
def quick_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims that last 0.3 s unless renewed every 0.1 s, and polls every 0.05 s."""
    monkeypatch.setattr(shared_module, "CLAIM_TTL", 0.3)
    monkeypatch.setattr(shared_module, "CLAIM_RENEW", 0.1)
    monkeypatch.setattr(shared_module, "POLL_FIRST", 0.05)
    monkeypatch.setattr(shared_module, "POLL_MAX", 0.05)


@pytest.mark.usefixtures("quick_claims")
def test_a_waiter_gets_the_holders_answer(make_home: Callable[[], SharedState]) -> None:
    """A process finding a prompt claimed waits, past the claim's lease, for the holder's
    answer instead of paying for it."""

    async def main() -> tuple[str | None, int]:
        a, b = make_home(), make_home()
        answers: dict[str, str] = {}
        looks = 0

        async def find() -> str | None:
            nonlocal looks
            looks += 1
            return answers.get("k")

        async def find_many(keys: list[str]) -> list[str | None]:
            return [answers.get(k) for k in keys]

        async def holder() -> None:
            gate: ClaimGate[str] = ClaimGate(a, find_many)
            assert await gate.enter("k") == ("claimed", None)
            await asyncio.sleep(1.0)  # longer than the lease: renewals keep it
            answers["k"] = "the answer"
            gate.leave("k", answered=True)

        task = asyncio.ensure_future(holder())
        await asyncio.sleep(0.1)
        found = await claim_or_find(b, "k", find)
        await task
        await closing(a, b)
        return found, looks

    found, looks = run(main)
    assert found == "the answer"
    assert looks > 5  # it kept looking while the holder worked


@pytest.mark.usefixtures("quick_claims")
def test_a_failed_holder_hands_the_prompt_over(make_home: Callable[[], SharedState]) -> None:
    """When the holder's request fails, a waiting process takes the claim over and sends."""

    async def main() -> str | None:
        a, b = make_home(), make_home()

        async def find() -> str | None:
            return None

        async def find_many(keys: list[str]) -> list[str | None]:
            return [None for _ in keys]

        async def holder() -> None:
            gate: ClaimGate[str] = ClaimGate(a, find_many)
            assert await gate.enter("k") == ("claimed", None)
            await asyncio.sleep(0.3)
            gate.leave("k", answered=False)  # the endpoint refused

        task = asyncio.ensure_future(holder())
        await asyncio.sleep(0.1)
        outcome = await claim_or_find(b, "k", find)
        await task
        taken = not await a.claim("k", 60.0)
        await closing(a, b)
        return outcome if taken else "a still held it"

    assert run(main) is None


# --------------------------------------------------------------------------------------------
# Claims of a batch, in bulk
# --------------------------------------------------------------------------------------------
def test_a_batch_claims_a_window_ahead_and_frees_what_it_never_sent(tmp_path: Path) -> None:
    """A planned batch claims its next keys a window at a time, in few round trips; another
    process finds them held. Keys another process stored an answer for come back found, and
    those another holds come back held. Closing the batch frees the claims it never used, and
    only those."""
    path = tmp_path / "shared.sqlite3"

    class Counted(SqliteState):
        round_trips = 0

        async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
            Counted.round_trips += 1
            return await super().claim_many(keys, ttl)

    async def main() -> tuple[list[str], int, list[bool], list[bool]]:
        ours, other = Counted(path), SqliteState(path)
        await other.claim("k5", 60.0)  # another process is paying for k5
        stored = {"k3": "answer of k3"}  # and stored an answer for k3

        async def find_many(keys: list[str]) -> list[str | None]:
            return [stored.get(k) for k in keys]

        gate: ClaimGate[str] = ClaimGate(ours, find_many, window=4)
        keys = [f"k{i}" for i in range(12)]
        gate.plan(keys)
        states = []
        for key in keys[:8]:
            state, _ = await gate.enter(key)
            states.append(state)
            if state == "claimed":
                gate.leave(key, answered=True)
        await asyncio.sleep(0.1)  # the last window asked ahead is claimed by now
        held_ahead = await other.claim_many(keys[8:], 60.0)
        gate.close()
        await asyncio.sleep(0.1)  # the release goes out
        freed = await other.claim_many(keys[8:], 60.0)
        kept = await other.claim_many(["k0"], 60.0)  # answered: left to expire, not freed
        await closing(ours, other)
        return states, Counted.round_trips, held_ahead, freed + kept

    states, round_trips, held_ahead, freed = run(main)
    assert states == ["claimed"] * 3 + ["found", "claimed", "held", "claimed", "claimed"]
    assert round_trips <= 4  # windows of keys, not one round trip per key
    assert not any(held_ahead[:2])  # claimed ahead of the batch, never sent
    assert all(freed[:2])  # ... and freed when the batch closed
    assert freed[-1] is False  # an answered claim is not freed: pollers find the answer


class GroupsSeen(InProcessState):
    """A home of this process that notes the size of every claim round trip, each taking
    ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.groups: list[int] = []

    async def claim_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        self.groups.append(len(keys))
        await asyncio.sleep(self.delay)
        return await super().claim_many(keys, ttl)


async def enter_planned(
    home: SharedState, window: int, keys: int, request: float = 0.0
) -> tuple[ClaimGate[str], list[str]]:
    """A batch of ``keys`` planned keys, entered one by one through a gate of ``window`` (no
    answer found anywhere), each request taking ``request`` seconds; the gate, closed, and the
    state each key got."""

    async def find_many(found: list[str]) -> list[str | None]:
        return [None] * len(found)

    gate: ClaimGate[str] = ClaimGate(home, find_many, window=window)
    planned = [f"k{i}" for i in range(keys)]
    gate.plan(planned)
    states = []
    for key in planned:
        state, _ = await gate.enter(key)
        states.append(state)
        gate.leave(key, answered=True)
        if request:
            await asyncio.sleep(request)
    gate.close()
    return gate, states


@pytest.mark.parametrize("claim_seconds", [0.0, 0.05])
def test_a_gate_asks_further_ahead_while_requests_wait_for_their_claims(
    claim_seconds: float,
) -> None:
    """A batch using keys faster than claims come back (50 ms a round trip, a request every
    millisecond) doubles its window of keys asked ahead, once per round trip, up to
    WINDOW_GROWTH times its first size. When claims come back in time, it stays as it was."""

    async def main() -> tuple[int, int, list[str]]:
        home = GroupsSeen(claim_seconds)
        gate, states = await enter_planned(home, window=4, keys=400, request=0.001)
        return gate._window, len(home.groups), states

    window, round_trips, states = run(main)
    assert states == ["claimed"] * 400
    if claim_seconds:
        assert window == 4 * WINDOW_GROWTH
        assert round_trips < 400 / 16
    else:
        assert window == 4
        assert round_trips >= 400 / 4


def test_a_gates_first_round_trip_is_small_and_the_next_ones_grow() -> None:
    """The first round trip of a batch's claims asks at most FIRST_WINDOW keys, so the first
    requests are not held back by thousands of claims; each round trip then doubles the lead
    up to the gate's window."""

    async def main() -> tuple[list[int], list[str]]:
        home = GroupsSeen()
        _, states = await enter_planned(home, window=512, keys=2000)
        return home.groups, states

    groups, states = run(main)
    assert states == ["claimed"] * 2000
    assert groups[0] <= 1 + FIRST_WINDOW  # the key entered, and a first window ahead
    assert max(groups) > 4 * FIRST_WINDOW  # grown towards the window of 512
