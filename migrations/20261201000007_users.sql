-- People who use Certo through its API, the remote CLI and the dashboard.
--
-- A user's token is printed once by `certo user add` and only its SHA-256 is kept here.
-- A revoked user keeps their row (what they submitted still names them) and their token
-- acts for nothing any more.
CREATE TABLE users (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9._-]{0,31}$'),
    role          text NOT NULL CHECK (role IN ('certifier', 'admin')),
    token_digest  text NOT NULL UNIQUE CHECK (token_digest ~ '^[0-9a-f]{64}$'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_seen_at  timestamptz
);

-- Whose patch a patch is: the user whose API submission first stored it. A certifier
-- may submit new revisions of, rerun and cancel only the patches they own; patches
-- stored on the orchestrator's own machine (`certo submit` without --server) have no owner
-- and only admins act on them through the API.
CREATE TABLE patch_owners (
    patch_id    bigint PRIMARY KEY,
    owner       text NOT NULL REFERENCES users (name),
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX patch_owners_owner ON patch_owners (owner);
