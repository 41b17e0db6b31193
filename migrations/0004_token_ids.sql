-- API tokens get an id (how the API names a token: listing, revoking,
-- rotating, the audit trail), an optional expiry and the latest use known
-- to the group (flushed by each gateway at most once a minute). A revoked
-- token's row is deleted.
--
-- Tokens created before ids existed: the first admin token is `bootstrap`
-- (what `BootstrapAdmin` names it now); any other is `t<created_at>` (what
-- applying an entry without an id names it), with `-<n>` after a second one
-- created in the same millisecond.
ALTER TABLE tokens ADD COLUMN id TEXT;
ALTER TABLE tokens ADD COLUMN expires_at INTEGER;   -- ms since the epoch; NULL: never
ALTER TABLE tokens ADD COLUMN last_used INTEGER;    -- ms since the epoch; NULL: not known

UPDATE tokens SET id = CASE
    WHEN name = 'bootstrap admin' AND role = 'admin' AND NOT EXISTS (
        SELECT 1 FROM tokens o WHERE o.name = 'bootstrap admin' AND o.role = 'admin'
            AND (o.created_at < tokens.created_at
                 OR (o.created_at = tokens.created_at AND o.token_hash < tokens.token_hash)))
        THEN 'bootstrap'
    ELSE 't' || created_at || COALESCE('-' || NULLIF((
        SELECT COUNT(*) FROM tokens o WHERE o.created_at = tokens.created_at
            AND o.token_hash < tokens.token_hash), 0), '')
END;

CREATE UNIQUE INDEX tokens_id ON tokens (id);

-- Who made each change (the `by` of its event): `token:<id>`,
-- `gateway:<node id>` or `device:<id>`; NULL for entries written before
-- the audit trail existed.
ALTER TABLE events ADD COLUMN actor TEXT;
