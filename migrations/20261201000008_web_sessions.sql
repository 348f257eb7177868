-- Dashboard sessions: signing in with a user token makes one; the browser holds its key in
-- an HttpOnly, SameSite=Strict cookie and only the key's SHA-256 is kept here. Forms carry
-- the session's CSRF token. Signing out ends the session: the cookie acts for nothing after.
CREATE TABLE web_sessions (
    key_digest   text PRIMARY KEY CHECK (key_digest ~ '^[0-9a-f]{64}$'),
    user_name    text NOT NULL REFERENCES users (name),
    csrf         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    ended_at     timestamptz
);
CREATE INDEX web_sessions_user ON web_sessions (user_name);
