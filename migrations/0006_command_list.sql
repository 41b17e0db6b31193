-- The fleet-wide command list (GET /v1/commands) filtered by status pages
-- by id within one status.
CREATE INDEX commands_status_id ON commands (status, id);
