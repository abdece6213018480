---------------------------- MODULE PromptQueue ----------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_prompt_queue.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* The per-session prompt queue: higher priority first, then first-come; one  *)
(* running prompt; authors (or the owner) cancel and re-prioritise queued     *)
(* prompts; stop ends the running one. The queue holds at most Window ended *)
(* prompts: when one more ends, the one that ended first is pruned (its       *)
(* events stay in the log; only the queue forgets it). Checked against        *)
(* core/src/queue.rs via Session in core/tests/model_prompt_queue.rs by       *)
(* bounded exhaustive search.                                                 *)
EXTENDS Naturals, FiniteSets, Sequences

CONSTANTS Users, Owner, Prompts, Priorities, MaxQueued, Window

VARIABLES status,   \* [Prompts -> {"new","queued","running","completed","failed","cancelled","stopped"}]
          prio,     \* [Prompts -> Priorities]
          arrival,  \* [Prompts -> Nat]
          author,   \* [Prompts -> Users]
          clock,    \* next arrival number
          started,  \* set of prompts that ever started (ghost)
          ended,    \* the prompts in the order they ended (Rust: finished_at, then arrival)
          pruned    \* prompts the queue no longer holds (their status lives on in the log)

vars == <<status, prio, arrival, author, clock, started, ended, pruned>>
Terminal == {"completed", "failed", "cancelled", "stopped"}
Queued == {p \in Prompts : status[p] = "queued"}
Running == {p \in Prompts : status[p] = "running"}
Before(p, q) == prio[p] > prio[q] \/ (prio[p] = prio[q] /\ arrival[p] < arrival[q])
Best == {p \in Queued : \A q \in Queued \ {p} : Before(p, q)}

\* Starting the next prompt happens in the same step as whatever freed the runner.
StartNext(st) ==
    IF \E p \in Prompts : st[p] = "running" THEN st
    ELSE LET Q == {p \in Prompts : st[p] = "queued"}
             B == {p \in Q : \A q \in Q \ {p} : Before(p, q)}
         IN IF B = {} THEN st ELSE [st EXCEPT ![CHOOSE p \in B : TRUE] = "running"]

Init == /\ status = [p \in Prompts |-> "new"] /\ prio = [p \in Prompts |-> 0]
        /\ arrival = [p \in Prompts |-> 0] /\ author = [p \in Prompts |-> Owner]
        /\ clock = 0 /\ started = {} /\ ended = << >> /\ pruned = {}

Track(st) == started' = started \cup {p \in Prompts : st[p] = "running"}

\* Prompt p ends: it joins the end order, and everything before the last Window is pruned.
Ends(p) == /\ ended' = Append(ended, p)
           /\ pruned' = {ended'[i] : i \in 1..(IF Len(ended') > Window THEN Len(ended') - Window ELSE 0)}

Enqueue(u, p, pr) == /\ status[p] = "new" /\ Cardinality(Queued) < MaxQueued
    /\ LET st == StartNext([status EXCEPT ![p] = "queued"])
       IN status' = st /\ Track(st)
    /\ prio' = [prio EXCEPT ![p] = pr] /\ arrival' = [arrival EXCEPT ![p] = clock]
    /\ author' = [author EXCEPT ![p] = u] /\ clock' = clock + 1
    /\ UNCHANGED <<ended, pruned>>

Cancel(u, p) == /\ status[p] = "queued" /\ (author[p] = u \/ u = Owner)
    /\ status' = [status EXCEPT ![p] = "cancelled"] /\ Ends(p)
    /\ UNCHANGED <<prio, arrival, author, clock, started>>

Reprioritize(u, p, pr) == /\ status[p] = "queued" /\ (author[p] = u \/ u = Owner)
    /\ prio' = [prio EXCEPT ![p] = pr]
    /\ UNCHANGED <<status, arrival, author, clock, started, ended, pruned>>

Stop(u) == \E p \in Running : /\ (author[p] = u \/ u = Owner)
    /\ LET st == StartNext([status EXCEPT ![p] = "stopped"]) IN status' = st /\ Track(st)
    /\ Ends(p)
    /\ UNCHANGED <<prio, arrival, author, clock>>

Finish(ok) == \E p \in Running :
    /\ LET st == StartNext([status EXCEPT ![p] = IF ok THEN "completed" ELSE "failed"])
       IN status' = st /\ Track(st)
    /\ Ends(p)
    /\ UNCHANGED <<prio, arrival, author, clock>>

Next == \/ \E u \in Users, p \in Prompts, pr \in Priorities : Enqueue(u, p, pr) \/ Reprioritize(u, p, pr)
        \/ \E u \in Users, p \in Prompts : Cancel(u, p)
        \/ \E u \in Users : Stop(u)
        \/ \E ok \in BOOLEAN : Finish(ok)

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_prompt_queue.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* Rust only: RunningMatchesPointer, EventsMirrorQueue, StartedWereAcked, PrunedRowsDeleted. (The
\* queue's running pointer agrees with the statuses, the statuses rebuilt from events equal the
\* state of every prompt the queue holds, only acknowledged prompts start, and a pruned prompt's
\* row is named dirty so the shell deletes it: implementation detail the spec has no variables
\* for. In Rust NoPromptLost reads "held or pruned": the spec's status never forgets.)
AtMostOneRunning == Cardinality(Running) <= 1
QueueBound == Cardinality(Queued) <= MaxQueued
WorkConserving == Running = {} => Queued = {}
\* Nothing acknowledged is lost: a prompt once queued never returns to "new".
NoPromptLost == [][\A p \in Prompts : status[p] # "new" => status'[p] # "new"]_vars
\* No prompt runs twice: a prompt that started is never running again after it ends.
NoRunTwice == [][\A p \in Prompts : (p \in started /\ status[p] # "running") => status'[p] # "running"]_vars
TerminalIsFinal == [][\A p \in Prompts : status[p] \in Terminal => status'[p] = status[p]]_vars
\* Order: whatever starts is the best queued prompt at that moment.
RunsInOrder == [][\A p \in Prompts : (status[p] = "queued" /\ status'[p] = "running")
                     => \A q \in Prompts \ {p} : status[q] = "queued" /\ status'[q] = "queued" => ~Before(q, p)]_vars
\* Bounded state: the queue holds at most Window ended prompts.
TerminalWindow == Cardinality({p \in Prompts \ pruned : status[p] \in Terminal}) <= Window
\* Queued and running prompts are never pruned.
OnlyEndedPruned == \A p \in pruned : status[p] \in Terminal
\* The ended prompts held are exactly the last Window to end.
KeepsLastEnded == {p \in Prompts \ pruned : status[p] \in Terminal}
                  = {ended[i] : i \in (IF Len(ended) > Window THEN Len(ended) - Window + 1 ELSE 1)..Len(ended)}
=============================================================================
