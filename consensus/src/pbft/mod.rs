//! PBFT behind the engine contract: Castro and Liskov, *Practical Byzantine
//! Fault Tolerance* (OSDI '99), with the view-change and checkpoint rules of
//! the TOCS 2002 paper.
//!
//! A group of n = 3f+1 replicas (f = (n-1)/3) stays safe with up to f
//! Byzantine members and live once the network delivers. Quorums are q =
//! ⌊(n+f)/2⌋+1 replicas (2f+1 for 3f+1), so two quorums share at least f+1
//! members, one of them correct. Membership is fixed at start: membership
//! changes and leadership transfer answer `Unsupported`.
//!
//! # Mapping onto the contract
//!
//! * `term()` is the view; the primary of view v is the `v mod n`-th member
//!   in id order. Its role is `Leader`, the backups' `Follower`, and a
//!   replica changing views (waiting for a NEW-VIEW) is a `Candidate`.
//! * Sequence numbers are log indices, **one request per sequence number**.
//!   The primary orders the requests it holds at each `ready` in
//!   pre-prepares of up to `max_batch` consecutive sequence numbers:
//!   `{view, first, requests, digest}`, the digest SHA-256 over `first` and
//!   the requests' digests. PREPARE and COMMIT name `(view, first, last,
//!   digest)`.
//! * `committed_entries` are `Entry { index: n, term: v, payload }` with the
//!   request's data, or `Empty` for a null request, a read, or a duplicate;
//!   `commit_index()` is the last executed sequence number.
//! * `propose(data)` at any replica signs `Request { client: own id, ts,
//!   data }` (ts above every executed timestamp of that client) and sends
//!   it to every replica: the primary orders it, backups time it. The
//!   answer is `Forwarded { to: primary }`; its fate shows in the committed
//!   entries.
//! * `read_index(ctx)` orders a read — a request without data — through
//!   the protocol; when it executes at sequence number n, a `ReadState {
//!   index: n, ctx }` comes out: everything executed up to n is a
//!   linearizable view (one full protocol round per read, no leases).
//!
//! # Normal case
//!
//! A backup accepts a pre-prepare only if the primary of its view signed
//! it, it is for the replica's current view and the replica is not changing
//! views, `first..=last` lies within the watermarks `(h, h+L]` (h the
//! stable checkpoint, L = `window`), the digest matches the requests, every
//! request carries its client's signature, and the replica has accepted in
//! that view no other batch overlapping `first..=last` (the same range with
//! another digest, or another range). It then sends PREPARE. A batch is
//! *prepared* with the accepted pre-prepare and q-1 (2f) matching PREPAREs
//! from distinct backups (its own included); the replica then sends
//! COMMIT. It is *committed-local* with q (2f+1) matching COMMITs, its own
//! included. Requests execute strictly in sequence order.
//!
//! **Why at most one value per (v, n)**: a batch prepared in view v at a
//! correct replica was accepted by q replicas (the primary and q-1
//! backups), at least f+1 of them correct; two prepared batches of view v
//! overlapping at n would need two such quorums, which share a correct
//! replica — and a correct replica accepts at most one batch covering n in
//! a view. So two correct replicas never prepare different requests for n
//! in one view, and a request committed at n in view v was prepared by at
//! least f+1 correct replicas.
//!
//! **At most once**: each replica keeps per client the highest executed
//! timestamp and the executed ones in the [`CLIENT_WINDOW`] below it, each
//! with the first 8 bytes of the digest of the request executed under it
//! (older ones count as executed) — a function of the executed sequence
//! only, so equal everywhere. A request ordered again (a faulty primary, a
//! retransmission ordered twice) executes as a null request. A replica
//! proposes above every executed timestamp of its own; one restarted
//! before its last requests executed may still reuse a timestamp, and
//! proposes its request again when it sees another request executed under
//! it (in the committed entries, or in the table of a snapshot).
//!
//! # Checkpoints and watermarks
//!
//! Every `checkpoint_interval` sequence numbers (default 128) a replica
//! signs CHECKPOINT `{n, digest}`: the digest of the [`CheckpointState`] —
//! the hash chain `h_n = SHA-256(h_{n-1} ‖ n ‖ request digest)` over the
//! executed history (zeros for a null request) and the at-most-once table —
//! the same on every correct replica whatever its application does. q
//! matching CHECKPOINTs make it stable (that set is its proof): the low
//! watermark h moves there, and the protocol log below it (votes,
//! checkpoint messages) is collected. The batches themselves are kept until
//! the driver compacts: `compact_keeping` (and `snapshot_meta_at`) accept
//! only the stable checkpoint, once its state is durable, and refuse other
//! indices with `NotApplied` naming the one that would do. The window L
//! defaults to 2 × `checkpoint_interval`.
//!
//! # View changes
//!
//! A backup that holds a request not executed within `request_timeout`
//! ticks moves to view v+1 and sends VIEW-CHANGE `{v+1, its stable
//! checkpoint with its proof, a prepared certificate (signed pre-prepare +
//! 2f signed PREPAREs) for every batch prepared above it}` — per sequence
//! number the certificate of the highest view. The primary of v+1, with q
//! valid VIEW-CHANGEs (its own included), sends NEW-VIEW `{v+1, those
//! VIEW-CHANGEs, one re-issued pre-prepare}` computed by
//! [`compute_new_view`]: min-s is the highest stable checkpoint among them,
//! max-s the highest prepared sequence number, and every n in (min-s,
//! max-s] gets the request prepared in the highest view (a null request
//! where none was), all in one batch from min-s+1. Every replica checks
//! every VIEW-CHANGE (signatures, checkpoint proof, certificates) and
//! recomputes the batch; a NEW-VIEW that differs (drops or changes a
//! prepared request) is rejected. A request committed at n in view v was
//! prepared by f+1 correct replicas, one of which is in any q VIEW-CHANGEs
//! and reports it (or a certificate of a later view, which by induction
//! carries the same request), so the new view re-issues it. A replica that
//! holds q VIEW-CHANGEs for its view (its own included) and waits in vain
//! for the NEW-VIEW moves on to the next view, the timeout doubling each
//! time (up to [`MAX_DOUBLINGS`] times) — without a quorum it waits, so a
//! replica cut off alone does not run ahead through the views; a replica that
//! receives VIEW-CHANGEs from f+1 others for views above its own joins the
//! smallest of them. VIEW-CHANGEs for later views count toward the quorum
//! that starts the timer: their senders timed out in this view and replaced
//! the VIEW-CHANGE they sent for it (only the latest per member is kept),
//! and counting only this view leaves correct replicas spread over a few
//! views waiting for each other; f members claiming high views gain nothing
//! they could not by signing VIEW-CHANGEs for exactly this view.
//!
//! **Idle primaries**: with no request waiting the request timer does not
//! run, so a dead primary of an idle group would stay until the next
//! request. An active replica that sent no PRE-PREPARE, PREPARE or COMMIT
//! since its last resend round signs and broadcasts ALIVE `{view,
//! executed}` ([`Alive`]) in this one (every `resend_tick`). A backup that
//! received no valid signed message naming its view from the primary of
//! that view (a pre-prepare, a COMMIT, an ALIVE) for `request_timeout`
//! ticks (counted from entering the view) starts a view change exactly as
//! its request timer would ([`PbftStats::idle_view_changes`]). Nothing is
//! weakened: the request timer runs regardless, so a faulty primary that
//! signs ALIVEs but orders nothing is replaced as before; the idle timer
//! fires at most once per view entered and the view-change rules above
//! then apply (no quorum, no further view), so no member — a replayed or
//! forged ALIVE, a member other than the primary — can make a backup spin
//! through views; a replayed ALIVE of the primary can only delay the idle
//! timer.
//!
//! **Shape before signatures**: a VIEW-CHANGE is refused before any
//! signature is checked unless it is shaped as a correct replica builds it —
//! at most L certificates, in views that never increase, each within
//! `(h, h+L]` of its checkpoint, none overlapping another of its view, each
//! the first to cover one of its sequence numbers (so no certificate is
//! repeated). **Conflicting certificates**: two valid prepared certificates
//! of one view for different batches covering one sequence number need two
//! quorums of PREPAREs whose shared correct backup accepted both, or a
//! correct primary that signed both — impossible with f Byzantine replicas.
//! A NEW-VIEW whose VIEW-CHANGEs hold such a pair is refused (and a primary
//! holding such a set sends none), counted in
//! [`PbftStats::conflicting_certificates`]: refusing costs nothing with f
//! faults, and beyond f no choice between them would be safe.
//!
//! # Catching up
//!
//! A replica that sees evidence of sequence numbers beyond what it executed
//! (signed votes, pre-prepares or checkpoints), or that waits for a
//! NEW-VIEW, or that sees signed messages above its watermark window, asks
//! one peer at a time (`Fetch`). So does one that saw signed pre-prepares
//! or votes of later views from f+1 other members, until it enters the
//! (f+1)-th highest of the views they claimed: one of them is correct, so
//! a correct replica holds that view's NEW-VIEW or a later one, and asking
//! round the peers reaches it once the network delivers — without this, a
//! restarted primary of an old view whose answers were lost stays there
//! for good once the group's traffic stops (it runs no request timer).
//! Fewer members claiming a later view (one message can claim any view)
//! make it ask every peer once, after which the view is forgotten
//! ([`PbftStats::later_view_given_up`]); while such messages keep coming a
//! fetch for that reason goes out every 16th resend until the replica
//! enters a view. Either way the replica only asks: it neither leaves its
//! view nor starts a view change for it. The answer is the peer's stable
//! checkpoint proof if the asker's is older (`Stable`), the NEW-VIEW of the
//! peer's view if the asker needs it, committed batches with q
//! signed COMMITs (self-certifying: any replica may hand them on), or —
//! when the asker is behind the peer's compacted log — a `Snapshot`
//! message carrying the snapshot's metadata
//! ([`EngineMessage::snapshot`](crate::engine::EngineMessage::snapshot) —
//! the driver ships the image), the engine's checkpoint state and the
//! checkpoint's proof. **What is checked**: the proof (q valid CHECKPOINT
//! signatures on the digest) and that the state hashes to that digest, so
//! the hash chain and the at-most-once table are the group's. **What is
//! not**: the image, which is the application's bytes; a Byzantine peer
//! can ship a wrong image under a correct proof. (Checking it needs an
//! application digest in the checkpoint: later work.)
//!
//! # Durability
//!
//! Persisted before any message that depends on it leaves (those messages
//! go out in `persisted_messages`; while such state waits to be persisted,
//! every message the replica queues waits with it, so a retransmission —
//! the VIEW-CHANGE resent in the tick that moved the replica to its view —
//! never overtakes the change it repeats): the view and the executed prefix in
//! `HardState { term: view, vote: None, commit }`, and every batch the
//! replica accepted, prepared or learned committed, as a record in the
//! entry at its first sequence number (the entry's term the highest view
//! covering it; entries inside a batch are `Empty`). A record holds the
//! signed pre-prepare with its requests and, once it has them, the
//! prepared certificate and the COMMITs. The entry just above the stable
//! checkpoint (and above the snapshot) also holds the checkpoint's state
//! and proof, and the batches straddling it. Persisting entries replaces
//! every stored entry from the first one's index, so the engine hands the
//! whole suffix out again whenever it rewrites one. On restart it decodes
//! the records, replays the executed prefix from the snapshot's checkpoint
//! state (the application gets the entries after its applied index again)
//! and restarts in its durable view: view 0 active, a later view as a
//! replica changing views until a peer hands it that view's NEW-VIEW (it
//! asks). Because accepted pre-prepares and certificates are durable, a
//! restarted replica never accepts (so never PREPAREs, COMMITs or reports
//! in a VIEW-CHANGE) a batch contradicting one it voted for. Likewise a
//! VIEW-CHANGE leaves only once its view is durable: a replica restarted in
//! the view it had left could still prepare and commit there, after a
//! NEW-VIEW had counted its VIEW-CHANGE without those batches.
//!
//! # Who is reachable
//!
//! Every replica (not only the primary: any member may need it) reports
//! per member in [`Pbft::status`]`.progress`: `recent_active` and
//! `connected` when a valid signed message from it (a pre-prepare, vote,
//! CHECKPOINT, VIEW-CHANGE or ALIVE) arrived within the last
//! `request_timeout` ticks — an active member signs one every resend round
//! at least — and `matched` the highest sequence number it signed a COMMIT
//! or CHECKPOINT for or reported executed in an ALIVE. Itself: always
//! active, `matched` its executed prefix. An ALIVE of a later view counts
//! toward the later-view claims of catch-up as a pre-prepare or vote does.
//!
//! # Signatures
//!
//! See [`crypto`]: every message body is signed over a canonical encoding
//! without the recipient, so signed messages are broadcast as they are and
//! embedded as proofs. Messages with a bad signature, from a non-member,
//! for another view, or outside the watermarks are dropped and counted
//! ([`Pbft::stats`], [`PbftStats`]); `step` answers `Ok` for them and an
//! error only for shapes no member sends (wrong recipient, sender 0 or
//! self, sequence numbers or views beyond the contract's limits, empty
//! batches).
//!
//! # Replies and certificates
//!
//! For each request (not a null request, not a read) a replica executes
//! it notes the leaf `(n, ts, request digest, h_n)` — h_n the hash chain
//! after it. At the end of an execution step (one pass of the execution
//! loop, normal path and `Committed` catch-up alike; the whole replay after
//! a restart) it signs, per client and view, ONE REPLY `{view, client,
//! first, last, root, count}` over the Merkle root of that client's leaves
//! (at most [`MAX_REPLY_LEAVES`], more are split; see [`certificate`] for
//! the tree) and sends it with the leaves ([`Replies`]) to the client; a
//! client's own reply counts for it. Replicas need not group alike. The
//! receiver checks the shape (signer is the sender, 1 to
//! [`MAX_REPLY_LEAVES`] leaves, `count` of them, in increasing n within
//! `first..=last`), recomputes the root and verifies the one signature —
//! only when some leaf names an own request still lacking this signer.
//! The client replica keeps, per own request waiting for its certificate
//! (at most `max_pending`; the oldest executed ones go first,
//! [`PbftStats::certificates_dropped`]) and per signer, the signed REPLY,
//! the leaf's position and Merkle path. Once it has executed the request
//! itself, leaves must match its execution (n, the request digest and
//! h_n): the others are dropped ([`PbftStats::bad_replies`], one per leaf,
//! with bad signatures, leaves not hashing to the signed root, bad shapes
//! and signers other than the sender; REPLYs with no leaf for a waiting own
//! request are [`PbftStats::stray_replies`]). With f+1 distinct members
//! whose leaves match, its own included, it has a **commit certificate**
//! ([`certificate`]; each member with its own path), taken with
//! [`Pbft::take_certificates`] (`Engine::take_certificates`; at most
//! `max_pending` kept untaken).
//! **Why it proves the commit**: at most f signers are Byzantine, so one
//! is correct and executed exactly that request at n after the history
//! h_n; a Byzantine leaf with another history, number or digest never
//! matches the client's own execution. **Lost replies**: from the second
//! resend round after executing, while replies are missing, the client
//! sends REPLY-ASK `{n, ts}` to the members it lacks; a replica answers
//! with the whole signed REPLY and leaves covering n, from those it signed
//! for the last `window` sequence numbers (also
//! for requests it executed from `Committed` batches, and after a restart
//! for the replayed ones; not part of the checkpoint state). An own request
//! executed inside an installed snapshot gets no certificate (the client
//! cannot name its sequence number).
//!
//! # What the simulation checks
//!
//! `consensus/tests/pbft_simulation.rs`: groups of 4 and 7 with up to f
//! Byzantine replicas (equivocating primary with colluding votes, forged
//! signatures, replays, old views, silence, selective delivery, lying and
//! hiding in VIEW-CHANGE, VIEW-CHANGEs of genuine but stale certificates
//! and checkpoint proofs, a backup preparing every version it is sent while
//! correct primaries of later views crash and restart, floods) under loss,
//! duplication, reordering, partitions and crash-restarts; after every
//! step, over correct replicas: no two execute different requests at one
//! sequence number, their executed histories agree (the hash chain at every
//! sequence number a replica reports, the [`CheckpointState`] digest at
//! checkpoints — a null request, a read and a duplicate all come out as
//! `Empty`), each executes in order, no value executes twice, and every
//! commit certificate a correct replica assembles verifies with the
//! group's keys and names the request correct replicas executed at its
//! index (with Byzantine replicas sending wrong and made-up REPLYs); after
//! the heal every proposal executes at every correct replica and is
//! certified at the replica that proposed it. With f+1 colluding Byzantine replicas
//! it finds a violation within a few seeds.

#[cfg(feature = "byzantine")]
pub mod byzantine;
pub mod certificate;
mod config;
mod core;
pub mod crypto;
mod engine;
mod message;

pub use config::{Config, ConfigError};
pub use core::{
    CLIENT_WINDOW, MAX_DOUBLINGS, Pbft, PbftStats, Reissue, compute_new_view,
    conflicting_certificates,
};
pub use message::{
    Alive, CheckpointProof, CheckpointState, CheckpointVote, ClientRecord, CommitCert,
    MAX_REPLY_LEAVES, Message, MessageKind, NewView, Phase, PrePrepare, PreparedCert, Replies,
    Reply, ReplyLeaf, Request, Signed, View, ViewChange, Vote, batch_digest,
};
