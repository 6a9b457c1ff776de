-- The fleet's source of truth. Runs inside the fleet schema (search_path); the migration runner records the version.

CREATE TABLE fleet_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Every change to people or erasures takes the next version, in commit order (see stamp_version), so a door that
-- has applied everything up to version V pulls exactly the rows with version > V.
CREATE SEQUENCE change_version;

CREATE TABLE people (
    id text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name text NOT NULL,
    name_key text NOT NULL UNIQUE,          -- NFC + casefold, computed by the client: names are unique fleet-wide
    note text,
    created_utc timestamptz NOT NULL DEFAULT now(),
    origin_door text,                       -- NULL: enrolled centrally
    version bigint NOT NULL DEFAULT 0
);
CREATE INDEX people_version ON people (version);

CREATE TABLE templates (
    person_id text NOT NULL REFERENCES people (id) ON DELETE CASCADE,
    position integer NOT NULL,
    embedding bytea NOT NULL CHECK (octet_length(embedding) = 512),  -- 128 little-endian float32, unit length
    source text NOT NULL,                   -- door id or 'central'
    created_utc timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (person_id, position)
);

-- Tombstones: only the id is kept, so an erased person leaves no name behind but late rows about them are recognised.
CREATE TABLE erasures (
    person_id text PRIMARY KEY,
    erased_utc timestamptz NOT NULL DEFAULT now(),
    by_door text,
    version bigint NOT NULL DEFAULT 0
);
CREATE INDEX erasures_version ON erasures (version);

CREATE TABLE doors (
    door_id text PRIMARY KEY,
    fingerprint text NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now(),
    applied_version bigint NOT NULL DEFAULT 0,
    audit_seq bigint NOT NULL DEFAULT 0
);

CREATE TABLE audit (
    door_id text NOT NULL,
    local_seq bigint NOT NULL,              -- the row id in the door's own log: (door_id, local_seq) is pushed once
    t_unix double precision NOT NULL,
    event text NOT NULL,
    person_id text,
    person text,
    track integer,
    frame integer,
    distance_l2 real,
    margin_l2 real,
    votes integer,
    door_action text,
    received_utc timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (door_id, local_seq)
);
CREATE INDEX audit_person ON audit (person_id);

CREATE TABLE admin_actions (
    id bigserial PRIMARY KEY,
    at_utc timestamptz NOT NULL DEFAULT now(),
    door_id text,                           -- NULL: done centrally
    action text NOT NULL,
    person_id text,
    detail text
);

CREATE FUNCTION stamp_version() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- One writer at a time per fleet until commit: versions become visible in the order they were handed out.
    PERFORM pg_advisory_xact_lock(hashtext(TG_TABLE_SCHEMA));
    NEW.version := nextval('change_version');
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_changes', NEW.version::text);
    RETURN NEW;
END $$;
CREATE TRIGGER people_version BEFORE INSERT OR UPDATE ON people FOR EACH ROW EXECUTE FUNCTION stamp_version();
CREATE TRIGGER erasures_version BEFORE INSERT OR UPDATE ON erasures FOR EACH ROW EXECUTE FUNCTION stamp_version();

CREATE FUNCTION audit_guard() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- a door that was cut off may push rows about someone erased meanwhile: they arrive anonymised
        IF NEW.person_id IS NOT NULL AND EXISTS (SELECT 1 FROM erasures WHERE person_id = NEW.person_id) THEN
            NEW.person_id := NULL;
            NEW.person := NULL;
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.person IS NULL AND NEW.person_id IS NULL
       AND (NEW.door_id, NEW.local_seq, NEW.t_unix, NEW.event, NEW.track, NEW.frame, NEW.distance_l2, NEW.margin_l2,
            NEW.votes, NEW.door_action, NEW.received_utc)
           IS NOT DISTINCT FROM (OLD.door_id, OLD.local_seq, OLD.t_unix, OLD.event, OLD.track, OLD.frame,
            OLD.distance_l2, OLD.margin_l2, OLD.votes, OLD.door_action, OLD.received_utc) THEN
        RETURN NEW;  -- anonymisation is the one change allowed
    END IF;
    RAISE EXCEPTION 'the fleet audit log is append-only (only erasure may blank a person)';
END $$;
CREATE TRIGGER audit_append_only BEFORE INSERT OR UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION audit_guard();
