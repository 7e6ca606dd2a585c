"""A feature store for the book's Q&A service (§6.1.6) on Feast: user features that feed the chat prompt.

    store = init_repo("qa_repo", synthetic_events(num_users=8))  # feature_store.yaml, parquet, apply
    materialize(store)                                            # offline (parquet) -> online (SQLite), incremental
    training_frame(store, entity_df)                              # point-in-time-correct join for training rows
    personalize_messages(store, "u3", [{"role": "user", "content": "..."}])  # request time: features -> preamble

(``synthetic_events`` is in ``cubelm.rag.feature_commands``.)

The entity is a user (join key ``user_id``, the OpenAI ``user`` field of a chat request); the feature view
``user_profile`` holds what an LLM can use when answering that user: preferred language, expertise level, recent
topics and how many questions they have asked. Each row is valid from its ``event_timestamp`` (when the fact became
true) until the next row of the same user or until the view's TTL runs out; ``created`` (ingest time) breaks ties
between rows with the same event time, so a later correction wins. A training join with an entity row
(user, t) therefore gets the latest row at or before t, never one from after t nor one ingested after t: no future
leaks into the past.

Stores, all local files under the repo directory: offline = a parquet file (Feast's file source), online = SQLite,
registry = a local protobuf file. Feast is heavy and optional: ``pip install 'cubelm[feature-store]'``; it is
imported only inside these functions.

The book's listing keys its view by ``question_id`` (SQuAD questions, answers and their embeddings); the issue
asks for what a Q&A service can use at request time, the asker's profile, so the entity here is the user. Where
the book's listing is wrong for today's Feast (0.67): ``ValueTypes.STRING`` is ``ValueType.STRING`` (an entity
names its ``join_keys`` too), ``event_timestamp_column`` was removed in favour of
``timestamp_field``, and ``utcnow()`` there means ``pd.Timestamp.now(tz="UTC")``.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cubelm.errors import CubelmError

PROJECT = "cubelm_qa"
JOIN_KEY = "user_id"
VIEW = "user_profile"
FEATURES = ("preferred_language", "expertise", "recent_topics", "question_count")
FEATURE_REFS = [f"{VIEW}:{name}" for name in FEATURES]
EVENTS = "data/user_profile.parquet"  # the offline store: one parquet file, relative to the repo directory
DEFAULT_TTL = timedelta(days=30)  # a profile older than this says nothing reliable about the user any more
_COLUMNS = [JOIN_KEY, *FEATURES, "event_timestamp", "created"]

_YAML = """\
# Written by cubelm.rag.features: the book's Q&A feature store (§6.1.6), all local files.
project: {project}
provider: local
registry: data/registry.db
online_store:
  type: sqlite
  path: data/online_store.db
offline_store:
  type: file
entity_key_serialization_version: 3
auth:
  type: no_auth
"""


def require_feast():
    try:
        import feast
    except ImportError:
        raise CubelmError("the feature store needs Feast: pip install 'cubelm[feature-store]' "
                          "(or run scripts/test-feature-store, which makes its own venv)") from None
    return feast


def definitions(ttl: timedelta = DEFAULT_TTL) -> list:
    """The Feast objects of the repo: the user entity and its profile view over the parquet file."""
    feast = require_feast()
    from feast.types import Array, Int64, String
    user = feast.Entity(name="user", join_keys=[JOIN_KEY], value_type=feast.ValueType.STRING,
                        description="a person asking the Q&A service")
    source = feast.FileSource(name="user_profile_events", path=EVENTS, timestamp_field="event_timestamp",
                              created_timestamp_column="created")
    view = feast.FeatureView(
        name=VIEW, entities=[user], ttl=ttl, online=True, source=source,
        schema=[feast.Field(name="preferred_language", dtype=String),
                feast.Field(name="expertise", dtype=String),  # beginner | intermediate | expert
                feast.Field(name="recent_topics", dtype=Array(String)),  # newest first
                feast.Field(name="question_count", dtype=Int64)])
    return [user, view]


def init_repo(repo_dir: str | Path, events, *, ttl: timedelta = DEFAULT_TTL):
    """Create (or overwrite) the feature repo in ``repo_dir`` with ``events`` as its offline data, register the
    definitions (``feast apply``) and return the open ``FeatureStore``."""
    feast = require_feast()
    repo = Path(repo_dir)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(_YAML.format(project=PROJECT))
    for stale in ("registry.db", "online_store.db"):  # a re-init starts from a clean registry and online store
        (repo / "data" / stale).unlink(missing_ok=True)
    write_events(repo, events, append=False)
    store = feast.FeatureStore(repo_path=str(repo))
    store.apply(definitions(ttl))
    return store


def open_store(repo_dir: str | Path):
    """The ``FeatureStore`` of a repo made by ``init_repo``; a clear error when it is not one."""
    feast = require_feast()
    repo = Path(repo_dir)
    if not (repo / "feature_store.yaml").is_file():
        raise CubelmError(f"{repo} is not a feature repo (no feature_store.yaml); create one with "
                          f"`cubelm features demo --repo {repo}`")
    try:
        store = feast.FeatureStore(repo_path=str(repo))
        views = {fv.name for fv in store.list_feature_views()}
    except Exception as e:  # noqa: BLE001 - a bad yaml or registry file: say which repo, in one line
        raise CubelmError(f"cannot open the feature repo {repo}: {type(e).__name__}: {e}") from None
    if VIEW not in views:
        raise CubelmError(f"the feature repo {repo} has no '{VIEW}' feature view; recreate it with "
                          f"`cubelm features demo --repo {repo}`")
    return store


def write_events(repo_dir: str | Path, events, *, append: bool = True) -> int:
    """Add rows of user events to the offline store (the parquet file); returns the number of rows it holds.

    Rows need ``user_id``, the four features and ``event_timestamp``; ``created`` (ingest time) defaults to the
    event time, as for a backfill. NOTE: ``training_frame`` hides a row from training rows before its created time
    (what was not yet known at t is not used at t), so a ``created`` of "now" on old events blanks every past
    training row unless ``known_at_time=False``. The file is replaced atomically (write beside, then rename), so a
    reader never sees half a file."""
    require_feast()  # pandas and pyarrow come with the extra
    import pandas as pd
    events = _checked_events(events)
    path = Path(repo_dir) / EVENTS
    if append and path.exists():
        events = pd.concat([pd.read_parquet(path), events], ignore_index=True)
    tmp = path.with_suffix(".parquet.tmp")
    events.to_parquet(tmp, index=False)
    tmp.replace(path)
    return len(events)


def _checked_events(events):
    import pandas as pd
    events = pd.DataFrame(events).copy()
    if "created" not in events and "event_timestamp" in events:
        events["created"] = events["event_timestamp"]
    missing = [c for c in _COLUMNS if c not in events]
    if missing:
        raise CubelmError(f"user events lack the column(s) {', '.join(missing)}; expected {', '.join(_COLUMNS)}")
    events = events[_COLUMNS]
    for col in ("event_timestamp", "created"):  # naive times are taken as UTC, as Feast does
        events[col] = pd.to_datetime(events[col], utc=True)
    events[JOIN_KEY] = events[JOIN_KEY].astype(str)
    events["question_count"] = events["question_count"].astype("int64")
    events["recent_topics"] = events["recent_topics"].map(list)
    return events


def materialize(store, end: datetime | None = None) -> None:
    """Copy what changed in the offline store since the last run up to ``end`` (default now) into the online store.

    Incremental: the first run starts at ``end - ttl`` (older rows are expired anyway), later runs where the last
    one stopped. A row whose event time is before that point but was written after the last run is not picked up:
    event time, not ingest time, decides (Feast's semantics); re-run ``init_repo`` for a full reload."""
    store.materialize_incremental(end_date=end or datetime.now(timezone.utc))


def training_frame(store, entity_df, *, known_at_time: bool = True):
    """Point-in-time-correct join: for each (user_id, event_timestamp) row of ``entity_df``, in its order, the
    user's features as they were at that instant (the latest row at or before it and within the TTL; missing
    values when there is none). Extra columns of ``entity_df`` (labels, the question) are kept.

    ``known_at_time`` (default) also leaves out rows *created* (ingested) after the instant: a correction written
    at t5 for an event at t0 did not exist for a request served at t1, and training on it would leak the future
    just as an event from t5 would. False is Feast's default: event time alone, corrections apply retroactively.

    NOTE: Feast's file (dask) offline store drops an entity row outright when its user has feature rows but none
    valid at that instant (all later, or all expired by the TTL), while a user with no rows at all keeps the row
    with nulls; and it collapses repeated (user, timestamp) rows. A training set must not lose examples depending
    on feature history, so Feast joins the distinct (user, timestamp) pairs and the result is merged back onto
    the entity dataframe: every entity row comes out once, with nulls where nothing was valid."""
    import pandas as pd
    entity_df = pd.DataFrame(entity_df).reset_index(drop=True)
    keys = [JOIN_KEY, "event_timestamp"]
    if any(k not in entity_df for k in keys):
        raise CubelmError(f"the entity dataframe needs columns {JOIN_KEY} and event_timestamp")
    if any(name in entity_df for name in FEATURES):
        raise CubelmError(f"the entity dataframe must not have columns named like a feature ({', '.join(FEATURES)})")
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    entity_df[JOIN_KEY] = entity_df[JOIN_KEY].astype(str)
    pairs = entity_df[keys].drop_duplicates()
    joined = store.get_historical_features(entity_df=pairs, features=FEATURE_REFS,
                                           filter_by_created_timestamp=known_at_time).to_df()[[*keys, *FEATURES]]
    joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True).astype(
        entity_df["event_timestamp"].dtype)  # the same resolution on both sides of the merge
    return entity_df.merge(joined, on=keys, how="left", validate="many_to_one")  # keeps entity_df's order


_online_lock = threading.Lock()  # one SQLite connection per store, shared by the server's worker threads


def online_features(store, user_ids: list[str]) -> list[dict]:
    """The latest materialized features of each user (values None for a user the online store does not know)."""
    with _online_lock:
        cols = store.get_online_features(features=FEATURE_REFS,
                                         entity_rows=[{JOIN_KEY: str(u)} for u in user_ids]).to_dict()
    return [{name: cols[name][i] for name in (JOIN_KEY, *FEATURES)} for i in range(len(user_ids))]


def preamble(features: dict) -> str | None:
    """A system-prompt preamble from one user's features; None when nothing is known about the user."""
    lang, level = features.get("preferred_language"), features.get("expertise")
    topics, count = features.get("recent_topics") or [], features.get("question_count")
    if lang is None and level is None and not topics and count is None:
        return None
    facts, asks = [], []
    if lang:
        facts.append(f"preferred language: {lang}")
        asks.append(f"answer in {lang}")
    if level:
        facts.append(f"expertise: {level}")
        asks.append({"beginner": "explain terms and avoid jargon", "expert": "be concise and technical"}.get(
            level, "assume working knowledge"))
    if topics:
        facts.append(f"recent topics: {', '.join(topics)}")
    if count is not None:
        facts.append(f"questions asked so far: {count}")
    text = "About the user (from the feature store): " + "; ".join(facts) + "."
    return text + (" Please " + ", ".join(asks) + "." if asks else "")


def personalize_messages(store, user_id: str, messages: list[dict]) -> list[dict]:
    """``messages`` with the user's online features as a system preamble: merged into the first message when it
    is a system message (chat templates expect at most one, first), else inserted before it. A user without
    features gets the messages unchanged. The input list is not modified."""
    text = preamble(online_features(store, [user_id])[0])
    messages = [dict(m) for m in messages]
    if text is None:
        return messages
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = text + "\n\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": text}, *messages]
