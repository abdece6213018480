\* GlobalBudget: the deployment-wide cap on running background agents lent to tenant shards (core/src/budget.rs), checked by core/tests/model_global_budget.rs.
----------------------------- MODULE GlobalBudget -----------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_global_budget.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* The budget object lends slots of Cap (BG_MAX_GLOBAL) to scheduler shards. *)
(* A shard asks only when its need changes: one exchange (acquire up to n,  *)
(* or release n) carrying a report <<seq, held>>: the exchange's number and *)
(* the slots the shard holds before it. The shell holds a lock across the   *)
(* call, so a shard has one exchange in flight and its report counts every  *)
(* answer it lived to see. A release is given up by the shard before it is  *)
(* sent. The budget ignores an exchange numbered no higher than one it has  *)
(* seen (a late request of a failed call or a dead instance); otherwise it  *)
(* lowers what it lends the shard to the report (a grant whose answer was   *)
(* lost comes back: Reconcile), then carries out the request. A shard that  *)
(* got fewer than it asked for waits; slots coming back wake the waiters,   *)
(* and while any shard waits the budget's alarm wakes every holder and      *)
(* waiter. A woken shard reports even when it has nothing to change.        *)
(*                                                                          *)
(* Bound of the Rust check (core/tests/model_global_budget.rs): Shards =    *)
(* {a, b}, Cap = 2, each shard a core Scheduler that could run 2 agents     *)
(* alone, at most 2 agents spawned per shard, at most 2 crashes (a failed   *)
(* call or a restart: the shard stops waiting, its answers are lost, what it *)
(* sent may still arrive), requests lost or delivered in any order, every   *)
(* sequence of up to 14 actions (about 67,000 states). The test's mutants   *)
(* (a grant of one too many, no fence, no reconcile, releases that wake     *)
(* nobody, no lock, a shard ignoring its holding, an alarm that skips the   *)
(* holders) are each caught by the property named beside them there.       *)
EXTENDS Naturals, FiniteSets

CONSTANTS Shards, Cap, Demand   \* Demand: the most slots a shard can use (its own limit)

VARIABLES lent,      \* [Shards -> Nat]: slots the budget lends each shard
          waiting,   \* shards that got fewer than they asked for
          seen,      \* [Shards -> Nat]: the newest exchange number seen from each shard
          held,      \* [Shards -> Nat]: slots each shard holds (stored)
          seq,       \* [Shards -> Nat]: each shard's latest exchange number (stored)
          running,   \* [Shards -> Nat]: agents starting or running in each shard
          want,      \* [Shards -> 0..Demand]: slots each shard can use now
          flight,    \* requests on their way: <<shard, seq, held, kind, n>>
          asking,    \* [Shards -> Nat]: the exchange each shard waits on (0: none)
          answer,    \* [Shards -> Nat \cup {-1}]: the grant on its way back (-1: none)
          woken,     \* shards a wake is on its way to
          synced     \* ghost: shards whose exchanges were all answered since the last crash

vars == <<lent, waiting, seen, held, seq, running, want, flight, asking, answer, woken, synced>>

Sum(f) == LET S[D \in SUBSET Shards] == IF D = {} THEN 0
                                       ELSE LET s == CHOOSE x \in D : TRUE IN f[s] + S[D \ {s}]
          IN S[Shards]
Free == IF Sum(lent) >= Cap THEN 0 ELSE Cap - Sum(lent)
Min(a, b) == IF a < b THEN a ELSE b

Init == /\ lent = [s \in Shards |-> 0] /\ waiting = {} /\ seen = [s \in Shards |-> 0]
        /\ held = [s \in Shards |-> 0] /\ seq = [s \in Shards |-> 0]
        /\ running = [s \in Shards |-> 0] /\ want = [s \in Shards |-> 0]
        /\ flight = {} /\ asking = [s \in Shards |-> 0] /\ answer = [s \in Shards |-> -1]
        /\ woken = {} /\ synced = Shards

\* The shard's need changes (agents spawned or ended); it starts agents only within held.
Need(s, w) == /\ want' = [want EXCEPT ![s] = w]
              /\ \E r \in 0..Min(w, held[s]) : running' = [running EXCEPT ![s] = r]
              /\ UNCHANGED <<lent, waiting, seen, held, seq, flight, asking, answer, woken, synced>>

\* One exchange, under the shard's lock: acquire the difference, release the surplus (given up at
\* once), or (woken, nothing to change) acquire 0 to report.
Exchange(s) ==
    /\ asking[s] = 0
    /\ want[s] # held[s] \/ s \in woken
    /\ seq' = [seq EXCEPT ![s] = seq[s] + 1]
    /\ asking' = [asking EXCEPT ![s] = seq[s] + 1]
    /\ IF want[s] >= held[s]
       THEN /\ flight' = flight \cup {<<s, seq[s] + 1, held[s], "acquire", want[s] - held[s]>>}
            /\ UNCHANGED held
       ELSE /\ flight' = flight \cup {<<s, seq[s] + 1, held[s], "release", held[s] - want[s]>>}
            /\ held' = [held EXCEPT ![s] = want[s]]
    /\ woken' = woken \ {s}
    /\ UNCHANGED <<lent, waiting, seen, running, want, answer, synced>>

\* The budget carries out a request: fenced, reconciled, then granted or released. (The wakes
\* travel back in the answer, and the shard sends them; abstracted here as immediate.)
Deliver(m) ==
    LET s == m[1] q == m[2] r == Min(lent[s], m[3]) n == m[5]
        g == IF m[4] = "acquire" THEN Min(n, Cap - (Sum(lent) - lent[s] + r)) ELSE 0
        after == IF m[4] = "acquire" THEN r + g ELSE r - n
        freed == after < lent[s]
    IN /\ m \in flight
       /\ flight' = flight \ {m}
       /\ IF q <= seen[s]
          THEN UNCHANGED <<lent, waiting, seen, answer, woken>>
          ELSE /\ seen' = [seen EXCEPT ![s] = q]
               /\ lent' = [lent EXCEPT ![s] = after]
               /\ waiting' = IF m[4] = "acquire" /\ g < n THEN waiting \cup {s} ELSE waiting \ {s}
               /\ answer' = IF asking[s] = q THEN [answer EXCEPT ![s] = g] ELSE answer
               /\ woken' = IF freed THEN woken \cup (waiting \ {s}) ELSE woken
       /\ UNCHANGED <<held, seq, running, want, asking, synced>>

Answer(s) == /\ answer[s] >= 0
             /\ held' = [held EXCEPT ![s] = held[s] + answer[s]]
             /\ answer' = [answer EXCEPT ![s] = -1]
             /\ asking' = [asking EXCEPT ![s] = 0]
             /\ synced' = synced \cup {s}
             /\ UNCHANGED <<lent, waiting, seen, seq, running, want, flight, woken>>

Lose(m) == /\ m \in flight /\ flight' = flight \ {m}
           /\ UNCHANGED <<lent, waiting, seen, held, seq, running, want, asking, answer, woken, synced>>

\* A failed call or a restart: the shard stops waiting; what it sent may still arrive.
Crash(s) == /\ asking' = [asking EXCEPT ![s] = 0] /\ answer' = [answer EXCEPT ![s] = -1]
            /\ synced' = synced \ {s}
            /\ UNCHANGED <<lent, waiting, seen, held, seq, running, want, flight, woken>>

Alarm == /\ waiting # {}
         /\ woken' = woken \cup waiting \cup {s \in Shards : lent[s] > 0}
         /\ UNCHANGED <<lent, waiting, seen, held, seq, running, want, flight, asking, answer, synced>>

Next == \/ \E s \in Shards, w \in 0..Demand : Need(s, w)
        \/ \E s \in Shards : Exchange(s) \/ Answer(s) \/ Crash(s)
        \/ \E m \in flight : Deliver(m) \/ Lose(m)
        \/ Alarm

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_global_budget.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* Slots lent never exceed BG_MAX_GLOBAL.
LentNeverExceedsCap == Sum(lent) <= Cap
\* A shard holds, with the grant on its way to it, no more than it is lent: the slots in use
\* never exceed the cap, however requests are lost, delayed or reordered.
NoShardHoldsMoreThanLent == \A s \in Shards : held[s] + (IF answer[s] >= 0 THEN answer[s] ELSE 0) <= lent[s]
\* A shard runs at most as many agents as it holds slots.
RunningNeverExceedsHeld == \A s \in Shards : running[s] <= held[s]
\* Nothing leaks for good: once a shard's exchange is answered with nothing lost since, the budget
\* lends it exactly what it holds.
LedgerMatchesAfterExchange == \A s \in synced : asking[s] = 0 => lent[s] = held[s]
\* An acquire that got fewer than it asked for leaves the shard waiting; one that got all, not.
ShortChangedShardWaits ==
    [][\A m \in flight : Deliver(m) /\ m[4] = "acquire" /\ m[2] > seen[m[1]] =>
          (m[1] \in waiting' <=> lent'[m[1]] - Min(lent[m[1]], m[3]) < m[5])]_vars
\* Slots that come back from a shard wake every other shard that waited.
FreedSlotsWakeWaiters ==
    [][\A m \in flight : Deliver(m) /\ lent'[m[1]] < lent[m[1]] => waiting \ {m[1]} \subseteq woken']_vars
\* While a shard waits, the alarm wakes every waiting shard and every shard holding slots.
AlarmWakesHoldersAndWaiters ==
    [][Alarm => waiting \cup {s \in Shards : lent[s] > 0} \subseteq woken']_vars
=============================================================================
