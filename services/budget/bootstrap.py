"""Applies the config file's ``tenants:`` section at start (declarative bootstrap).

Idempotent: tenants, keys and budgets are upserted by their ids (budgets by
tenant, level, subject and window), so a second start with the same file
changes nothing, and a changed secret replaces the stored hash. Teams and
projects that keys name are created. Things removed from the file are left
alone, and a tenant deleted or a key revoked through the API stays so.
"""

from __future__ import annotations

import dataclasses
import logging

from orchestra.budget.v1 import account_service_pb2
from services.budget import convert, keys, validation
from services.budget.accounts import AccountStore
from services.budget.admission import Admission
from services.budget.budgets import BudgetStore
from services.budget.keystore import KeyStore
from services.common.config_file import ApiKeyEntry, TenantEntry
from services.common.errors import OrchestraError

log = logging.getLogger(__name__)


class BootstrapError(ValueError):
    """The config file's tenants cannot be applied; the message names the field."""


@dataclasses.dataclass
class Report:
    """What a bootstrap changed."""

    tenants: int = 0
    keys: list[str] = dataclasses.field(default_factory=list)
    budgets: int = 0

    @property
    def changed(self) -> bool:
        """Whether anything changed."""
        return bool(self.tenants or self.keys or self.budgets)


def _check_key(entry: ApiKeyEntry, where: str) -> None:
    if entry.project and not entry.team:
        raise BootstrapError(f"{where}.team: a key bound to a project must name its team")
    named = keys.key_id_of(entry.secret)
    if named is not None and named != entry.id:
        raise BootstrapError(
            f"{where}.secret: an 'ok_' secret must carry the key's own id ({entry.id!r})"
        )
    for name, value in (("team", entry.team), ("project", entry.project)):
        if value and not keys.valid_key_id(value):
            raise BootstrapError(f"{where}.{name}: must match [a-z0-9][a-z0-9-]{{0,62}}")


class Bootstrap:
    """Applies tenants, keys and budgets from the config file."""

    def __init__(
        self,
        accounts: AccountStore,
        keystore: KeyStore,
        budgets: BudgetStore,
        admission: Admission,
    ) -> None:
        self._accounts = accounts
        self._keys = keystore
        self._budgets = budgets
        self._admission = admission

    async def apply(self, tenants: list[TenantEntry]) -> Report:
        """Upserts every tenant of the file.

        Raises:
            BootstrapError: An entry is inconsistent (naming the field).
        """
        report = Report()
        for index, entry in enumerate(tenants):
            where = f"tenants[{index}]"
            try:
                await self._tenant(entry, where, report)
            except OrchestraError as exc:
                raise BootstrapError(f"{where}: {exc.message}") from exc
        if report.changed:
            log.info(
                "config applied: %d tenant(s), %d key(s), %d budget(s) changed",
                report.tenants,
                len(report.keys),
                report.budgets,
            )
        return report

    async def _tenant(self, entry: TenantEntry, where: str, report: Report) -> None:
        if await self._accounts.tenant_deleted(entry.id):
            log.warning("%s: tenant %r was deleted through the API; not recreated", where, entry.id)
            return
        policy = convert.policy_from_entry(entry.policy)
        validation.policy(policy, f"{where}.policy")
        if await self._accounts.upsert_tenant(entry.id, entry.display_name, policy):
            report.tenants += 1
        for k, key_entry in enumerate(entry.api_keys):
            await self._key(entry.id, key_entry, f"{where}.api_keys[{k}]", report)
        tz = validation.time_zone(policy.time_zone, f"{where}.policy.time_zone")
        for b, budget_entry in enumerate(entry.budgets):
            budget = convert.budget_from_entry(entry.id, budget_entry)
            validation.budget(budget, f"{where}.budgets[{b}]")
            stored, changed = await self._budgets.upsert_config(budget)
            if changed:
                report.budgets += 1
                await self._admission.seed(stored, tz)

    async def _key(self, tenant_id: str, entry: ApiKeyEntry, where: str, report: Report) -> None:
        _check_key(entry, where)
        if entry.project:
            project = await self._accounts.find_project(tenant_id, entry.project)
            if project is not None and project.team_id != entry.team:
                raise BootstrapError(
                    f"{where}.project: project {entry.project!r} belongs to team"
                    f" {project.team_id!r}, not {entry.team!r}"
                )
        await self._accounts.ensure_team_and_project(tenant_id, entry.team, entry.project)
        key = account_service_pb2.ApiKey(
            tenant_id=tenant_id,
            key_id=entry.id,
            display_name=entry.display_name,
            team=entry.team,
            project=entry.project,
            scopes=convert.scope_values(entry.scopes),
        )
        if await self._keys.upsert_config_key(key, keys.digest(entry.secret)):
            report.keys.append(entry.id)
