\* SandboxSnapshot: a session's snapshot manager (core/src/snapshot.rs), checked by core/tests/model_sandbox_snapshot.rs.
--------------------------- MODULE SandboxSnapshot ---------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_sandbox_snapshot.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* A session's sandbox is live or has exited. After each turn, and before    *)
(* the sandbox's time limit, the newest turn is snapshotted (one request at  *)
(* a time); snapshots expire on a clock that advances in ticks, the oldest   *)
(* beyond Keep are dropped, and every dropped one is queued for deletion at  *)
(* the provider. A follow-up on an exited sandbox restores the newest live   *)
(* snapshot, or starts cold from the repository.                             *)
(*                                                                           *)
(* Shell contract assumed: the provider answers each snapshot request once   *)
(* (taken or not taken; the same answer may be handled twice in a row), and *)
(* the near-limit alarm drops expired snapshots before asking near_limit,    *)
(* which has no clock: without that, a current-turn snapshot that expired    *)
(* but is still held makes near_limit decline, and the turn's work can be    *)
(* lost (the test's NearLimitWithoutExpire mutant shows the trace).          *)
(*                                                                           *)
(* Bound of the Rust check (core/tests/model_sandbox_snapshot.rs): up to 5   *)
(* turns, clock 0..3, a ttl of 2 ticks, Keep = 3 (snapshot::KEEP), every    *)
(* sequence of up to 12 actions (snapshot ids are bounded by the depth).    *)
(* History variables below are the test's ghost state; invariants and step  *)
(* properties carry the same names there.                                   *)
EXTENDS Naturals, FiniteSets

CONSTANTS MaxTurns, MaxTime, TTL, Keep

VARIABLES turns,      \* finished turns so far
          taking,     \* the turn whose snapshot is being taken: {} or {t}
          snaps,      \* held snapshots: records [id, turn, at, exp]
          toDelete,   \* ids to delete at the provider (expired or superseded)
          now,        \* the clock
          live,       \* the session's sandbox is live
          nextId,     \* ids 1..nextId have been handed out by the provider
          \* History (ghost) variables:
          inFlight,   \* snapshot requests outstanding at the provider (turns)
          taken,      \* every snapshot the provider took and answered
          deleted,    \* ids deleted at the provider by the shell
          lost,       \* ids the provider lost on its own (the shell forgot them)
          superseded, \* ids dropped because Keep newer snapshots were held
          kept        \* ids that should be held (Land, Expire and Forget applied to ids alone)

vars == <<turns, taking, snaps, toDelete, now, live, nextId, inFlight, taken, deleted, lost, superseded, kept>>

Ids(S) == {s.id : s \in S}
Max(S) == CHOOSE m \in S : \A x \in S : x <= m
\* Newer by (turn, taken at): the order the manager keeps its snapshots in.
Later(a, b) == a.turn > b.turn \/ (a.turn = b.turn /\ a.at > b.at)
Newest(S) == {s \in S : \A o \in S : ~Later(o, s)}
Oldest(S) == CHOOSE s \in S : \A o \in S : ~Later(s, o)
LiveIn(S) == {s \in S : s.exp > now}
\* Which snapshot a follow-up restores: {} is a cold start.
Start == Newest(LiveIn(snaps))
\* The latest turn whose snapshot completed and is still restorable: live, not lost, not superseded.
\* The ghost's expiry pass: the kept ids whose snapshot is still live.
KeptLive == {x.id : x \in {y \in taken : y.id \in kept /\ y.exp > now}}
Covered == LET C == {s.turn : s \in {x \in LiveIn(taken) : x.id \notin lost \cup superseded}}
           IN IF C = {} THEN {} ELSE {Max(C)}

\* Asks for a snapshot of turn t unless one is in flight or the newest held is already turn t.
Request(t, held) ==
    IF taking = {} /\ ~(held # {} /\ Max({s.turn : s \in held}) = t)
    THEN taking' = {t} /\ inFlight' = inFlight \cup {t}
    ELSE UNCHANGED <<taking, inFlight>>

\* A landed snapshot joins the held ones; beyond Keep the oldest is dropped.
Land(S, n) == LET all == S \cup {n} IN IF Cardinality(all) > Keep THEN all \ {Oldest(all)} ELSE all

Init == /\ turns = 0 /\ taking = {} /\ snaps = {} /\ toDelete = {} /\ now = 0 /\ live = TRUE
        /\ nextId = 0 /\ inFlight = {} /\ taken = {} /\ deleted = {} /\ lost = {} /\ superseded = {}
        /\ kept = {}

TurnEnded == /\ live /\ turns < MaxTurns /\ turns' = turns + 1
             /\ Request(turns + 1, snaps)
             /\ UNCHANGED <<snaps, toDelete, now, live, nextId, taken, deleted, lost, superseded, kept>>

\* The near-limit alarm: drop expired snapshots (queued for deletion), then ask for the current turn.
NearLimit == LET fresh == LiveIn(snaps) IN
             /\ live
             /\ snaps' = fresh /\ toDelete' = toDelete \cup Ids(snaps \ fresh)
             /\ Request(turns, fresh)
             /\ kept' = KeptLive
             /\ UNCHANGED <<turns, now, live, nextId, taken, deleted, lost, superseded>>

\* Someone asks for a snapshot now (POST /sandbox/:id/snapshot): the current turn even if a
\* snapshot holds it (the checkout may have changed since), but never beside one in flight.
Requested == /\ live
             /\ IF taking = {}
                THEN taking' = {turns} /\ inFlight' = inFlight \cup {turns}
                ELSE UNCHANGED <<taking, inFlight>>
             /\ UNCHANGED <<snaps, toDelete, turns, now, live, nextId, taken, deleted, lost, superseded, kept>>

Taken == \E t \in inFlight :
           LET n == [id |-> nextId + 1, turn |-> t, at |-> now, exp |-> now + TTL]
               held == Land(snaps, n)
           IN /\ snaps' = held
              /\ toDelete' = toDelete \cup Ids((snaps \cup {n}) \ held)
              /\ superseded' = superseded \cup Ids((snaps \cup {n}) \ held)
              /\ taking' = taking \ {t} /\ inFlight' = inFlight \ {t}
              /\ nextId' = nextId + 1 /\ taken' = taken \cup {n}
              /\ kept' = LET K == kept \cup {n.id}
                       IN IF Cardinality(K) > Keep
                          THEN K \ {Oldest({y \in taken \cup {n} : y.id \in K}).id} ELSE K
              /\ UNCHANGED <<turns, now, live, deleted, lost>>

\* The snapshot failed (the sandbox was already gone): nothing is held for it.
NotTaken == \E t \in inFlight :
              /\ taking' = taking \ {t} /\ inFlight' = inFlight \ {t}
              /\ UNCHANGED <<turns, snaps, toDelete, now, live, nextId, taken, deleted, lost, superseded, kept>>

Exit == live /\ live' = FALSE
        /\ UNCHANGED <<turns, taking, snaps, toDelete, now, nextId, inFlight, taken, deleted, lost, superseded, kept>>

\* A follow-up on an exited sandbox: restore Start (or start cold).
Restore == ~live /\ live' = TRUE
           /\ UNCHANGED <<turns, taking, snaps, toDelete, now, nextId, inFlight, taken, deleted, lost, superseded, kept>>

Tick == now < MaxTime /\ now' = now + 1
        /\ UNCHANGED <<turns, taking, snaps, toDelete, live, nextId, inFlight, taken, deleted, lost, superseded, kept>>

\* The expiry alarm.
Expire == /\ snaps' = LiveIn(snaps) /\ toDelete' = toDelete \cup Ids(snaps \ LiveIn(snaps))
          /\ kept' = KeptLive
          /\ UNCHANGED <<turns, taking, now, live, nextId, inFlight, taken, deleted, lost, superseded>>

\* The provider confirmed a deletion.
Delete(id) == /\ id \in toDelete /\ toDelete' = toDelete \ {id} /\ deleted' = deleted \cup {id}
              /\ UNCHANGED <<turns, taking, snaps, now, live, nextId, inFlight, taken, lost, superseded, kept>>

\* The provider lost a held snapshot on its own (expired early): the shell forgets it.
Forget(id) == /\ id \in Ids(snaps)
              /\ snaps' = {s \in snaps : s.id # id} /\ lost' = lost \cup {id} /\ kept' = kept \ {id}
              /\ UNCHANGED <<turns, taking, toDelete, now, live, nextId, inFlight, taken, deleted, superseded>>

Next == \/ TurnEnded \/ NearLimit \/ Requested \/ Taken \/ NotTaken \/ Exit \/ Restore \/ Tick \/ Expire
        \/ \E id \in 1..nextId : Delete(id) \/ Forget(id)

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_sandbox_snapshot.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* Restore picks the newest held snapshot still live; cold only when none is.
RestoresNewestLive == /\ Cardinality(Start) <= 1
                      /\ (Start = {}) = (LiveIn(snaps) = {})
                      /\ \A s \in Start, o \in LiveIn(snaps) : ~Later(o, s)
\* Never an expired, deleted, queued or lost snapshot.
NeverRestoresExpired == \A s \in Start : s.exp > now /\ s.id \notin toDelete \cup deleted \cup lost
AtMostOneInFlight == Cardinality(inFlight) <= 1 /\ taking = inFlight
AtMostKeepHeld == Cardinality(snaps) <= Keep
\* Every snapshot taken is held, queued for deletion, deleted, or was lost by the provider;
\* none held is also queued, deleted or lost.
DroppedAreDeleted == /\ Ids(taken) \subseteq Ids(snaps) \cup toDelete \cup deleted \cup lost
                     /\ Ids(snaps) \cap (toDelete \cup deleted \cup lost) = {}
                     /\ toDelete \cap deleted = {}
\* The held snapshots are exactly the Keep newest taken by (turn, taken at), less those an expiry
\* pass dropped and those the provider lost: the test keeps this set as its own ghost (kept),
\* never reading it from the manager.
KeepsNewest == Ids(snaps) = kept
\* No work lost: restore yields the latest turn whose snapshot completed and is restorable
\* (its checkout holds every earlier turn's work too).
NoWorkLost == {s.turn : s \in Start} = Covered

\* After a turn ends with a live sandbox, its snapshot is requested unless one is in flight.
SnapshotAfterTurn == [][TurnEnded => (inFlight # {} \/ turns' \in inFlight')]_vars
\* Once the in-flight one has landed, near-limit requests the current turn unless a live
\* snapshot of it is held.
NewerTurnNext == [][NearLimit => (inFlight # {} \/ (\E s \in LiveIn(snaps) : s.turn = turns)
                                  \/ turns \in inFlight')]_vars
\* The same answer handled twice in a row changes nothing.
TakenIdempotent == [][Taken => \A n \in taken' \ taken : Land(snaps', n) = snaps']_vars
=============================================================================
