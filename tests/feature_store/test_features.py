"""The feature store (cubelm.rag.features, Feast): point-in-time joins against a plain-pandas reference, TTL,
corrections by created time, incremental materialization to the online store, the personalized prompt, and
``cubelm serve --feature-store`` answering a chat with ``user`` set.

Runs only where the feature-store extra is installed (scripts/test-feature-store makes that venv); elsewhere it
is skipped. ``import feast`` alone takes ~20 s on a 2-core host, so the repos are module-scoped where possible.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("feast", reason="the feature-store extra is not installed (scripts/test-feature-store)")

import pandas as pd  # noqa: E402 - after the skip

from cubelm.rag import features as F  # noqa: E402
from cubelm.rag.feature_commands import synthetic_events  # noqa: E402
from helpers import assert_clean_error, cli_in_process  # noqa: E402

NOW = datetime.now(timezone.utc).replace(microsecond=0)
TTL = timedelta(days=30)
T0 = NOW - timedelta(days=10)  # u1's first profile
T2 = T0 + timedelta(days=4)  # u1's second profile: the "future" seen from any instant in [T0, T2)
OLD = NOW - timedelta(days=45)  # u2's only profile: expired (TTL) for every instant after OLD + TTL


def row(user, lang, level, topics, count, ts, created=None):
    return {"user_id": user, "preferred_language": lang, "expertise": level, "recent_topics": topics,
            "question_count": count, "event_timestamp": ts, "created": created or ts}


EVENTS = [
    row("u1", "English", "beginner", ["python"], 3, T0),
    row("u1", "French", "expert", ["sql", "python"], 60, T2),
    row("u2", "German", "intermediate", ["git"], 20, OLD),
    # u3: a row and its correction, same event time, ingested an hour apart (created breaks the tie)
    row("u3", "Spanish", "beginner", ["linux"], 5, T0, created=T0),
    row("u3", "Spanish", "beginner", ["linux"], 7, T0, created=T0 + timedelta(hours=1)),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = F.init_repo(tmp_path_factory.mktemp("qa_repo"), pd.DataFrame(EVENTS), ttl=TTL)
    F.materialize(s, NOW)
    return s


def counts(frame) -> list:
    return [None if pd.isna(c) else int(c) for c in frame["question_count"]]


def test_training_join_is_point_in_time_correct(store):
    times = [T0 - timedelta(hours=1), T0, T0 + timedelta(days=1), T2 - timedelta(seconds=1), T2,
             T2 + timedelta(days=1)]
    entity = pd.DataFrame({"user_id": ["u1"] * len(times), "event_timestamp": times, "label": range(len(times))})
    out = F.training_frame(store, entity.iloc[::-1])  # any order in, the same order out
    assert list(out["label"]) == list(range(len(times)))[::-1]
    out = out.sort_values("label")
    # before any row: nothing (and the row is kept); at or after T0 but before T2: T0's value, never T2's
    assert counts(out) == [None, 3, 3, 3, 60, 60]
    assert list(out["preferred_language"].iloc[1:]) == ["English"] * 3 + ["French"] * 2
    assert list(out["recent_topics"].iloc[4]) == ["sql", "python"]
    future = out[out["event_timestamp"] < T2]
    assert not (future["question_count"] == 60).any()  # no leak of the value written at T2


def test_ttl_expires_old_profiles(store):
    entity = pd.DataFrame({"user_id": ["u2"] * 3 + ["nobody"],
                           "event_timestamp": [OLD + timedelta(days=29), OLD + TTL, OLD + TTL + timedelta(seconds=1),
                                               NOW]})
    out = F.training_frame(store, entity)
    assert counts(out) == [20, 20, None, None]  # valid for exactly TTL after its event time, then unknown
    assert len(out) == 4  # Feast alone drops the expired row; training_frame keeps every example
    # online: the first incremental materialization starts at end - TTL, so the expired profile never got there
    assert F.online_features(store, ["u2"])[0]["question_count"] is None


def test_correction_wins_from_its_created_time(store):
    entity = pd.DataFrame({"user_id": ["u3"] * 2, "event_timestamp": [T0 + timedelta(minutes=30),
                                                                      T0 + timedelta(hours=2)]})
    # at T0+30min the correction (created T0+1h) was not known yet; afterwards it replaces the first row
    assert counts(F.training_frame(store, entity)) == [5, 7]
    # by event time alone (Feast's default) the correction applies retroactively: the later-ingested value leaks
    assert counts(F.training_frame(store, entity, known_at_time=False)) == [7, 7]
    assert F.online_features(store, ["u3"])[0]["question_count"] == 7


def reference_join(events: pd.DataFrame, entity: pd.DataFrame, ttl: timedelta) -> list:
    """Plain pandas: the latest row with event time in [t - ttl, t] and created time <= t; ties by created."""
    out = []
    for user, t in zip(entity["user_id"], entity["event_timestamp"]):
        ok = events[(events.user_id == user) & (events.event_timestamp <= t) & (events.event_timestamp >= t - ttl)
                    & (events.created <= t)]
        out.append(None if ok.empty else int(ok.sort_values(["event_timestamp", "created"]).iloc[-1].question_count))
    return out


def test_training_join_matches_reference_on_synthetic_history(tmp_path):
    events = synthetic_events(5, end=NOW, days=40, events_per_user=6, seed=3)
    ttl = timedelta(days=10)
    store = F.init_repo(tmp_path / "repo", events, ttl=ttl)
    rng = random.Random(0)
    entity = pd.DataFrame({"user_id": [f"u{rng.randrange(6)}" for _ in range(60)],  # u5 has no events at all
                           "event_timestamp": [NOW - timedelta(seconds=rng.uniform(0, 45 * 86400))
                                               for _ in range(60)]})
    events = events.assign(event_timestamp=pd.to_datetime(events.event_timestamp, utc=True),
                           created=pd.to_datetime(events.created, utc=True))
    expected = reference_join(events, entity.assign(event_timestamp=pd.to_datetime(entity.event_timestamp,
                                                                                   utc=True)), ttl)
    assert counts(F.training_frame(store, entity)) == expected
    assert None in expected and len(set(expected)) > 10  # the draw covers gaps, expiry and many versions


def test_online_store_serves_latest_materialized_value(tmp_path):
    store = F.init_repo(tmp_path / "repo", pd.DataFrame(EVENTS[:2]), ttl=TTL)
    assert F.online_features(store, ["u1"])[0]["question_count"] is None  # nothing materialized yet
    first_end = NOW - timedelta(hours=1)
    F.materialize(store, first_end)
    assert F.online_features(store, ["u1"])[0] == {
        "user_id": "u1", "preferred_language": "French", "expertise": "expert", "recent_topics": ["sql", "python"],
        "question_count": 60}
    # a new profile arrives after that run: online only after the next (incremental) materialization
    later = NOW - timedelta(minutes=30)
    assert F.write_events(tmp_path / "repo", [row("u1", "Japanese", "expert", ["pytorch"], 61, later)]) == 3
    assert F.online_features(store, ["u1"])[0]["question_count"] == 60
    F.materialize(store, NOW)
    got = F.online_features(store, ["u1", "nobody"])
    assert got[0]["question_count"] == 61 and got[0]["preferred_language"] == "Japanese"
    assert got[1]["question_count"] is None


def test_personalized_prompt_carries_the_features(store):
    question = {"role": "user", "content": "What is a window function?"}
    msgs = F.personalize_messages(store, "u1", [{"role": "system", "content": "Be helpful."}, question])
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1] == question
    system = msgs[0]["content"]
    for fact in ("French", "expert", "sql, python", "60", "answer in French"):
        assert fact in system, system
    assert system.endswith("Be helpful.")  # merged into the one system message, the client's text kept
    alone = F.personalize_messages(store, "u1", [question])
    assert alone[0]["role"] == "system" and "French" in alone[0]["content"] and alone[1] == question
    assert F.personalize_messages(store, "nobody", [question]) == [question]


def test_bad_repo_and_entity_frame_are_clean_errors(tmp_path, capsys, store):
    assert_clean_error(cli_in_process(capsys, "features", "get", "--repo", tmp_path / "none", "--user", "u1"),
                       "not a feature repo", "features demo")
    with pytest.raises(F.CubelmError, match="needs columns user_id and event_timestamp"):
        F.training_frame(store, pd.DataFrame({"user": ["u1"]}))
    with pytest.raises(F.CubelmError, match="lack the column"):
        F.write_events(tmp_path, [{"user_id": "u1"}])


def test_features_demo_cli(tmp_path, capsys):
    r = cli_in_process(capsys, "features", "demo", "--repo", tmp_path / "demo", "--num-users", "3")
    assert r.returncode == 0, r.stderr
    assert "training join (point in time)" in r.stdout and "online store" in r.stdout
    assert "system: About the user" in r.stdout
    r = cli_in_process(capsys, "features", "get", "--repo", tmp_path / "demo", "--user", "u1", "--user", "zz")
    assert r.returncode == 0 and "preamble: About the user" in r.stdout and "nothing known" in r.stdout


# ---- cubelm serve --feature-store -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, store):
    import httpx
    import uvicorn

    from cubelm.serve.app import create_app
    from cubelm.serve.commands import ServeOptions
    from cubelm.serve.state import ServerState
    state = ServerState(ServeOptions(model=str(model_dir), served_model_name="m", num_blocks=256,
                                     feature_store=str(store.repo_path)))
    srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning",
                                        lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        thread.join(0.05)
    base = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    for _ in range(600):
        if httpx.get(f"{base}/ready").status_code == 200:
            break
        thread.join(0.1)
    yield base
    srv.should_exit = True
    thread.join(15)


def test_serve_personalizes_chat_with_user(server, store):
    import httpx
    messages = [{"role": "user", "content": "hello"}]

    def chat(**extra):
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4,
                                                             "temperature": 0, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def prompt_tokens(msgs):
        return httpx.post(f"{server}/tokenize", json={"model": "m", "messages": msgs}).json()["count"]

    with_user = chat(user="u1")
    assert with_user["choices"][0]["message"]["role"] == "assistant"
    # the engine saw exactly the personalized messages: the same prompt as the template over them
    assert with_user["usage"]["prompt_tokens"] == prompt_tokens(F.personalize_messages(store, "u1", messages))
    assert chat()["usage"]["prompt_tokens"] == prompt_tokens(messages) < with_user["usage"]["prompt_tokens"]
    assert chat(user="nobody")["usage"]["prompt_tokens"] == prompt_tokens(messages)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'cubelm:feature_lookups_total{model_name="m",result="personalized"} 1.0' in metrics
    assert 'cubelm:feature_lookups_total{model_name="m",result="unknown_user"} 1.0' in metrics


def test_serve_with_a_bad_feature_repo_exits_cleanly(tmp_path, capsys, model_dir):
    assert_clean_error(cli_in_process(capsys, "serve", "--model", model_dir, "--feature-store", tmp_path / "none"),
                       "not a feature repo")
