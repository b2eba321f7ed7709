"""Every component's schema migrations of a store at once (``medview-server upgrade``).

Each component applies its own pending migrations when it opens its tables
(:meth:`server.dbutil.Db.migrate`); this opens them all."""
from __future__ import annotations


def upgrade_all(store) -> dict[str, int]:
    """Open every component's tables of ``store`` (a :class:`server.store.Store`),
    which applies their pending migrations; returns component -> schema version."""
    from .auth import Authority
    from .diagnosis import DiagnosisRecords
    from .dbutil import Db
    from .jobs import Leases
    from .policy_copies import PolicyCopies
    from .slide_catalogue import SlideCatalogue
    from .tiers import Tiers
    from .versions import VersionTable

    store.catalogue                                   # the catalogue's own migrations
    where = store.database
    parts = [Authority(where), DiagnosisRecords(where), Leases(where), PolicyCopies(store),
             SlideCatalogue(where), Tiers(store), VersionTable(store, lambda: None)]
    for part in parts:
        part.close()
    db = Db(where)
    try:
        return {c: int(v) for c, v in db.all(
            "SELECT component, version FROM schema_migrations ORDER BY component")}
    finally:
        db.close()
