-- The organization pages' sign-in: one-time links sent by email, and the sessions a
-- browser holds. Neither the link's token nor the session's cookie value is stored, only
-- their SHA-256, as for API keys: a copy of this table signs nobody in.
CREATE TABLE web_sign_in_links (
    token_hash text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz NULL
);
CREATE INDEX web_sign_in_links_user_id ON web_sign_in_links (user_id);

CREATE TABLE web_sessions (
    id_hash text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Every form of the session carries it; a POST without it is refused (CSRF).
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- One message for the next page the session shows ("Invitation sent to ..."), then null.
    notice text NULL,
    notice_is_error boolean NOT NULL DEFAULT false
);
CREATE INDEX web_sessions_user_id ON web_sessions (user_id);
CREATE INDEX web_sessions_expires_at ON web_sessions (expires_at);
