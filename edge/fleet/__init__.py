"""Many doors, one truth: PostgreSQL holds people, templates, erasures and the audit trail; each door keeps deciding
from its own store and syncs beside the door loop (central.py: the database side; sync.py: the door's replica;
cli.py: `python -m edge fleet …`; sim.py: the many-door simulator behind `fleet bench`)."""
