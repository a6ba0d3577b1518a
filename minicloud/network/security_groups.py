"""Security groups: create (with validated rules), add and remove rules, delete when no other group's rule names it,
and the project's ``default`` group made on first use. List, show and the description/labels patch are generic.

A rule that names a remote group commits a compare-and-swap "touch" of that group in the same transaction, and a
group's delete is a compare-and-swap too: a rule added meanwhile makes the delete read again and refuse, so no rule
is ever left naming a deleted group.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import Any

from minicloud import errors, ids
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.network import SecurityGroupCreate, SecurityGroupRuleCreate
from minicloud.network import ipam
from minicloud.network.kinds import SECURITY_GROUP, RuleSpec, SecurityGroupSpec
from minicloud.state import Op, Store, Update, list_all

DEFAULT_GROUP = "default"
RULE_PREFIX = "sgr"
ANY_CIDR = "0.0.0.0/0"

Group = Obj[SecurityGroupSpec, Any]


def egress_all() -> RuleSpec:
    return RuleSpec(id=ids.new_id(RULE_PREFIX), direction="egress", protocol="any", remote_cidr=ANY_CIDR)


def default_rules(group_id: str) -> list[RuleSpec]:
    """The ``default`` group: all egress; ingress only from members of the group itself."""
    return [
        egress_all(),
        RuleSpec(id=ids.new_id(RULE_PREFIX), direction="ingress", protocol="any", remote_group=group_id),
    ]


async def ensure_default_group(ctx: Context, store: Store) -> Group:
    """The project's ``default`` group, created if missing (first use: the project's first network or group, later
    a NIC without groups). Its creation is audited as ``network:securitygroups:create`` on its own, never under the
    caller's ``Idempotency-Key``. Safe under concurrency: a lost race reads the winner's."""
    found = await crud.find(ctx, store, SECURITY_GROUP, DEFAULT_GROUP)
    if found is not None:
        return found
    own = dataclasses.replace(ctx, action="network:securitygroups:create", idempotency=None)
    group = SECURITY_GROUP.new(
        project=ctx.project,
        name=DEFAULT_GROUP,
        spec=SecurityGroupSpec(description="default: all egress, ingress from members of this group"),
        stamp=ctx.clock(),
    )
    group = group.replace(spec=SecurityGroupSpec(description=group.spec.description, rules=default_rules(group.id)))
    try:
        written = await crud.create(own, store, SECURITY_GROUP, group)
    except errors.AlreadyExists:
        return await crud.get(ctx, store, SECURITY_GROUP, DEFAULT_GROUP)
    return group.replace(revision=written.revision)


# -- rules -----------------------------------------------------------------------------------------------------------
def rule_spec(body: SecurityGroupRuleCreate, remote_group_id: str | None) -> RuleSpec:
    """A validated rule (422 naming the field): ports only for tcp/udp and 1-65535 with min <= max; at most one of
    a remote CIDR and a remote group; neither means ``0.0.0.0/0``."""
    port_min, port_max = body.port_min, body.port_max
    if body.protocol in ("tcp", "udp"):
        if port_min is None and port_max is not None:
            raise ipam.bad("port_min", "give port_min with port_max")
        if port_min is not None:
            port_max = port_min if port_max is None else port_max
            if port_min < 1 or port_max < 1:
                raise ipam.bad("port_min", "ports are 1-65535")
            if port_min > port_max:
                raise ipam.bad("port_max", f"the port range {port_min}-{port_max} is empty: port_min > port_max")
    elif port_min is not None or port_max is not None:
        raise ipam.bad("port_min", f"protocol {body.protocol} has no ports; leave port_min and port_max out")
    if body.remote_cidr is not None and body.remote_group is not None:
        raise ipam.bad("remote_cidr", "give remote_cidr or remote_group, not both")
    remote_cidr = None
    if remote_group_id is None:
        text = body.remote_cidr if body.remote_cidr is not None else ANY_CIDR
        try:
            remote_cidr = str(ipaddress.IPv4Network(text, strict=True))
        except ValueError as exc:
            raise ipam.bad("remote_cidr", f"'{text[:43]}' is not an IPv4 CIDR ({exc})") from None
    return RuleSpec(
        id=ids.new_id(RULE_PREFIX),
        direction=body.direction,
        protocol=body.protocol,
        port_min=port_min,
        port_max=port_max,
        remote_cidr=remote_cidr,
        remote_group=remote_group_id,
        description=body.description,
    )


def _same(a: RuleSpec, b: RuleSpec) -> bool:
    key = ("direction", "protocol", "port_min", "port_max", "remote_cidr", "remote_group")
    return all(getattr(a, k) == getattr(b, k) for k in key)


def _check_new(rules: Iterable[RuleSpec], rule: RuleSpec, group_name: str) -> None:
    for existing in rules:
        if _same(existing, rule):
            raise errors.Conflict(f"security group '{group_name}' already has this rule ({existing.id})")


def _touch(ctx: Context, group: Group) -> Update:
    """A compare-and-swap no-op write of ``group``: a concurrent delete of it fails and reads again."""
    return Update(SECURITY_GROUP.dump(group.replace(updated_at=ctx.clock())), expect_revision=group.revision)


async def _remote(ctx: Context, store: Store, ref: str | None) -> Group | None:
    """The remote group ``ref`` names in the caller's project (404 otherwise: another project's is not found)."""
    return None if ref is None else await crud.get(ctx, store, SECURITY_GROUP, ref)


# -- services --------------------------------------------------------------------------------------------------------
async def create_group(ctx: Context, store: Store, body: SecurityGroupCreate) -> Written:
    """Create a group: the given rules, or all egress when ``rules`` is absent. A rule may name the new group itself
    (by its name) as remote group. Atomic; 409 for a taken name."""
    if body.name != DEFAULT_GROUP:
        await ensure_default_group(ctx, store)

    async def step(_: int) -> Written:
        group = SECURITY_GROUP.new(
            project=ctx.project,
            name=body.name,
            spec=SecurityGroupSpec(description=body.description),
            labels=body.labels,
            stamp=ctx.clock(),
        )
        rules: list[RuleSpec] = []
        touched: dict[str, Group] = {}
        for rule_body in body.rules if body.rules is not None else []:
            if rule_body.remote_group in (body.name, group.id):
                remote_id: str | None = group.id
            elif (remote := await _remote(ctx, store, rule_body.remote_group)) is not None:
                touched[remote.id] = remote
                remote_id = remote.id
            else:
                remote_id = None
            rule = rule_spec(rule_body, remote_id)
            _check_new(rules, rule, body.name)
            rules.append(rule)
        if body.rules is None:
            rules.append(egress_all())
        group = group.replace(spec=SecurityGroupSpec(description=body.description, rules=rules))
        extra: list[Op] = [_touch(ctx, g) for g in touched.values()]
        return await crud.create(ctx, store, SECURITY_GROUP, group, extra=extra)

    return await ipam.retrying(step)


#: Rules per group (the create body's bound too): every node compiles every group its ports use.
MAX_RULES = 100


async def add_rule(
    ctx: Context, store: Store, ref: str, body: SecurityGroupRuleCreate, *, expect: int | None = None
) -> Written:
    """Append a rule (422 for a bad one, 404 for a remote group not in the project, 409 for a duplicate)."""

    async def step(_: int) -> Written:
        group = await crud.get(ctx, store, SECURITY_GROUP, ref)
        remote = await _remote(ctx, store, body.remote_group)
        if remote is not None and remote.id == group.id:
            remote = None
            remote_id: str | None = group.id
        else:
            remote_id = remote.id if remote is not None else None
        rule = rule_spec(body, remote_id)
        _check_new(group.spec.rules, rule, group.name)
        if len(group.spec.rules) >= MAX_RULES:
            raise errors.Conflict(
                f"security group '{group.name}' already has {MAX_RULES} rules, the most a group may have; "
                "remove one or split the group"
            )

        def mutate(g: Group) -> Group:
            return g.replace(spec=SecurityGroupSpec(description=g.spec.description, rules=[*g.spec.rules, rule]))

        return await crud.update(
            ctx,
            store,
            SECURITY_GROUP,
            group.id,
            mutate,
            expect=expect if expect is not None else group.revision,
            extra=(lambda _g: [_touch(ctx, remote)]) if remote is not None else None,
        )

    return await (step(0) if expect is not None else ipam.retrying(step))


async def remove_rule(ctx: Context, store: Store, ref: str, rule_id: str, *, expect: int | None = None) -> Written:
    """Remove one rule by id (404 when the group has no such rule)."""

    def mutate(g: Group) -> Group:
        rules = [r for r in g.spec.rules if r.id != rule_id]
        if len(rules) == len(g.spec.rules):
            raise errors.NotFound(
                f"security group '{g.name}' has no rule '{crud.shown(rule_id)}'; "
                f"see `minicloud security-group show {g.name}`"
            )
        return g.replace(spec=SecurityGroupSpec(description=g.spec.description, rules=rules))

    return await crud.update(ctx, store, SECURITY_GROUP, ref, mutate, expect=expect)


async def referrers(store: Store, group: Group) -> list[str]:
    """Names of the other groups of the project with a rule naming ``group``."""
    records = await list_all(store, SECURITY_GROUP.name, project=group.project)
    return sorted(
        o.name
        for o in map(SECURITY_GROUP.load, records)
        if o.id != group.id and any(r.remote_group == group.id for r in o.spec.rules)
    )


async def delete_group(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a group no other group's rule names (409 naming them). ``default`` may be deleted (say, before its
    project) and is made again on next use."""

    async def step(_: int) -> Written:
        group = await crud.get(ctx, store, SECURITY_GROUP, ref)
        if expect is not None and expect != group.revision:
            raise errors.PreconditionFailed(
                "the security group was changed since the revision you sent in If-Match; read it again and retry"
            )
        if names := await referrers(store, group):
            raise errors.InUse(
                f"security group '{group.name}' is named by rules of {', '.join(repr(n) for n in names)}; "
                "remove those rules first"
            )
        return await crud.delete_obj(ctx, store, SECURITY_GROUP, group, expect=group.revision)

    return await (step(0) if expect is not None else ipam.retrying(step))
