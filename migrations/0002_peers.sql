-- Peer (Raft) addresses of gateways added to the group at run time, so every
-- member (and every member restarted later) can reach them. Members named in
-- --peers at start need no row; a row overrides the flag.
CREATE TABLE peers (
    id      INTEGER PRIMARY KEY NOT NULL,   -- node id
    address TEXT NOT NULL                   -- host:port of its peer listener
);
