"""Cluster-wide settings: ``minicloud cluster settings|set|unset`` (cluster administrators only).

A setting (:data:`minicloud.cluster.kinds.SETTINGS`) that was set is one ``clustersetting`` record in the replicated
state, so every node applies the same value whichever answers a request. One that was never set (or was unset) has
no record: each node then uses its own configuration file's key (``SettingDef.config_key``). The precedence is
built-in default < ``minicloud.toml`` < environment < cluster setting (CONVENTIONS 16).

Writes are compare-and-swap: ``set`` updates the record at the revision it read (or at ``expect``, a request's
``If-Match``: 412 if stale), creates it under a fixed id (``cset-<name>``) so two concurrent first sets cannot make two
records, and retries on a fresh read when someone else wrote in between; ``unset`` deletes at the revision read (or
``expect``) and is idempotent (unsetting what is not set answers 204). Each write is audited in its transaction.

Readers on the request path (the scheduler) read the value through the placement cache
(:func:`minicloud.compute.nodes.cluster_setting`): no store read per decision.
"""

from __future__ import annotations

from typing import Any

from minicloud import errors
from minicloud.cluster.kinds import CLUSTER_SETTING, SETTINGS, ClusterSettingSpec, SettingDef
from minicloud.config import Config
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.model import ClusterSetting
from minicloud.state import Create, Delete, Op, Store, Update

_ATTEMPTS = 5


def setting_id(name: str) -> str:
    return f"{CLUSTER_SETTING.prefix}-{name}"


def known(name: str) -> SettingDef:
    """The setting ``name``; 404 naming the settings there are otherwise."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise errors.NotFound(
            f"there is no cluster setting '{name[:64]}'; the settings are {', '.join(sorted(SETTINGS))} "
            "(`minicloud cluster settings`)",
            invalid_params=[{"name": "name", "reason": "unknown setting"}],
        )
    return setting


def node_value(config: Config, setting: SettingDef) -> str:
    """What this node's configuration says for ``setting`` (its ``config_key``)."""
    section, key = setting.config_key.split(".", 1)
    return str(getattr(getattr(config, section), key))


def effective_value(setting: SettingDef, stored: str | None, config: Config) -> str:
    """Pure: the value that applies on a node: the cluster's when set, else the node's configuration."""
    return stored if stored is not None else node_value(config, setting)


def _view(setting: SettingDef, record: Any, config: Config) -> ClusterSetting:
    if record is not None:
        return CLUSTER_SETTING.view_record(record)
    return ClusterSetting(
        name=setting.name,
        value=node_value(config, setting),
        source="node-config",
        config_key=setting.config_key,
        choices=list(setting.choices),
        description=setting.description,
    )


async def get_setting(store: Store, config: Config, name: str) -> ClusterSetting:
    """The setting ``name`` as this node applies it (404 for an unknown name)."""
    setting = known(name)
    return _view(setting, await store.get(CLUSTER_SETTING.name, setting_id(name)), config)


async def list_settings(store: Store, config: Config) -> list[ClusterSetting]:
    """Every setting the cluster knows, by name, as this node applies it."""
    return [await get_setting(store, config, name) for name in sorted(SETTINGS)]


def _check_value(setting: SettingDef, value: str) -> None:
    if value not in setting.choices:
        reason = f"must be one of {', '.join(setting.choices)}"
        raise errors.ValidationFailed(
            f"{setting.name}: '{value[:64]}' is not a value it takes: {reason}",
            invalid_params=[{"name": "value", "reason": reason}],
        )


async def set_setting(ctx: Context, store: Store, name: str, value: str, *, expect: int | None = None) -> Written:
    """Set ``name`` to ``value`` on the whole cluster (200 with the :class:`ClusterSetting`; 404 unknown setting, 422
    a value it does not take, 412 when ``expect`` is not the current revision: 0 or absent record for "not set").
    Compare-and-swap; setting the current value again writes nothing new but the audit entry."""
    setting = known(name)
    _check_value(setting, value)
    for _ in range(_ATTEMPTS):
        record = await store.get(CLUSTER_SETTING.name, setting_id(name))
        current = record.revision if record is not None else 0
        if expect is not None and expect != current:
            raise errors.PreconditionFailed(
                f"cluster setting {name} is at revision {current}, not {expect} (If-Match); read it again and retry"
            )
        stamp = ctx.clock()
        op: Op
        if record is None:
            obj = CLUSTER_SETTING.new(
                project="", name=name, id=setting_id(name), spec=ClusterSettingSpec(value=value), stamp=stamp
            )
            op = Create(CLUSTER_SETTING.dump(obj))
        else:
            obj = CLUSTER_SETTING.load(record)
            obj = obj.replace(spec=ClusterSettingSpec(value=value), updated_at=stamp)
            op = Update(CLUSTER_SETTING.dump(obj), expect_revision=record.revision)
        try:
            return await commit(
                ctx,
                store,
                [op],
                status=200,
                label="cluster setting",
                respond=lambda rev, o=obj: CLUSTER_SETTING.to_view(o.replace(revision=rev)),
            )
        except (errors.PreconditionFailed, errors.AlreadyExists, errors.NotFound):
            if expect is not None:
                raise errors.PreconditionFailed(
                    f"cluster setting {name} was changed by someone else; read it again and retry"
                ) from None
            continue  # another writer went first: read again
    raise errors.Conflict(f"cluster setting {name} kept changing while this request ran; retry it")


async def unset_setting(ctx: Context, store: Store, name: str, *, expect: int | None = None) -> Written:
    """Remove the cluster's value of ``name``: every node uses its configuration file's again (204; also when it
    was not set). 404 unknown setting, 412 when ``expect`` is not the current revision."""
    setting = known(name)
    for _ in range(_ATTEMPTS):
        record = await store.get(CLUSTER_SETTING.name, setting_id(setting.name))
        current = record.revision if record is not None else 0
        if expect is not None and expect != current:
            raise errors.PreconditionFailed(
                f"cluster setting {name} is at revision {current}, not {expect} (If-Match); read it again and retry"
            )
        if record is None:
            return Written(None, 204, 0)
        op = Delete(kind=CLUSTER_SETTING.name, id=record.id, expect_revision=record.revision)
        try:
            return await commit(ctx, store, [op], status=204, label="cluster setting", respond=lambda rev: None)
        except (errors.PreconditionFailed, errors.NotFound):
            if expect is not None:
                raise errors.PreconditionFailed(
                    f"cluster setting {name} was changed by someone else; read it again and retry"
                ) from None
            continue
    raise errors.Conflict(f"cluster setting {name} kept changing while this request ran; retry it")
