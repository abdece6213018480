---------------------------- MODULE SandboxLink ----------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_sandbox_link.rs, an exhaustive bounded exploration of the production core type
\* HostedSession (core/src/hosted.rs); core/tests/specs_match_checks.rs keeps the property names
\* below and its checks in step.
(* A session's prompts and its sandbox link: the running prompt is handed to  *)
(* the session's sandbox (spawned, started again or live); the sandbox sends  *)
(* numbered events, stored in order and then acknowledged; a sandbox that is  *)
(* silent past its heartbeat timeout (or disconnected past its grace) is lost. *)
(* Each spawn is a new link generation (its token): frames of a retired        *)
(* generation are refused.                                                     *)
EXTENDS Naturals, Sequences

CONSTANTS Prompts, Gens, Timeout, MaxN

VARIABLES queue,     \* sequence of waiting prompts
          running,   \* a prompt or NoPrompt
          gen,       \* the current link generation (0: none yet)
          stage,     \* "none" | "spawning" | "ready" | "stopped" | "lost" | "failed"
          working,   \* the prompt the current generation acknowledged starting
          awaiting,  \* the current generation's spawn is unanswered
          retryAt,   \* after a failed spawn, no new spawn before this time
          lastN,     \* highest event number stored for the current generation
          stored,    \* sequence of stored event numbers (ghost)
          silentFor, \* time since the sandbox was last heard from
          now

NoPrompt == "none"
Live == {"spawning", "ready"}
vars == <<queue, running, gen, stage, working, awaiting, retryAt, lastN, stored, silentFor, now>>

Spawn == /\ gen' = gen + 1 /\ stage' = "spawning" /\ awaiting' = TRUE /\ lastN' = 0
         /\ working' = NoPrompt /\ silentFor' = 0

\* A prompt becomes running and is handed to the sandbox (a new one when none is live).
Start(p) == /\ running = NoPrompt /\ queue # <<>> /\ Head(queue) = p
            /\ running' = p /\ queue' = Tail(queue)
            /\ IF stage \in Live THEN UNCHANGED <<gen, stage, working, awaiting, lastN, silentFor>>
               ELSE IF stage = "failed" /\ now < retryAt THEN UNCHANGED <<gen, stage, working, awaiting, lastN, silentFor>>
               ELSE Spawn
            /\ UNCHANGED <<retryAt, stored, now>>

\* The provider refuses: the prompt the spawn was for fails, and the next spawn waits.
Refused == /\ awaiting /\ awaiting' = FALSE /\ stage' = "failed" /\ retryAt' = now + 1
           /\ running' = NoPrompt
           /\ UNCHANGED <<queue, gen, working, lastN, stored, silentFor, now>>

\* The sandbox sends event n of the current generation: stored when it is the next, then acknowledged.
Event(n) == /\ stage \in Live /\ running # NoPrompt /\ n = lastN + 1 /\ n <= MaxN
            /\ lastN' = n /\ stored' = Append(stored, n) /\ working' = running /\ silentFor' = 0
            /\ UNCHANGED <<queue, running, gen, stage, awaiting, retryAt, now>>

\* Past its timeout the sandbox is lost: a prompt it acknowledged fails; one it never started
\* is handed to a new sandbox.
Lose == /\ stage \in Live \ {"spawning"} /\ silentFor >= Timeout
        /\ IF running # NoPrompt /\ working # running
           THEN Spawn /\ UNCHANGED running
           ELSE /\ stage' = "lost" /\ running' = NoPrompt
                /\ UNCHANGED <<gen, working, awaiting, lastN, silentFor>>
        /\ UNCHANGED <<queue, retryAt, stored, now>>

Tick == /\ now' = now + 1 /\ silentFor' = silentFor + 1
        /\ UNCHANGED <<queue, running, gen, stage, working, awaiting, retryAt, lastN, stored>>

Init == /\ queue \in Seq(Prompts) /\ running = NoPrompt /\ gen = 0 /\ stage = "none"
        /\ working = NoPrompt /\ awaiting = FALSE /\ retryAt = 0 /\ lastN = 0
        /\ stored = <<>> /\ silentFor = 0 /\ now = 0

Next == \/ \E p \in Prompts : Start(p)
        \/ Refused \/ Lose \/ Tick
        \/ \E n \in 1..MaxN : Event(n)

Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_sandbox_link.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

\* A running prompt always has something that moves it on: a live sandbox (whose heartbeat,
\* grace or spawn poll is a deadline), an awaited provider answer, or a retry time.
RunningPromptProgresses == running # NoPrompt => (stage \in Live \/ awaiting \/ stage = "failed")
\* Stored event numbers increase with none twice; nothing is acknowledged before it is stored.
AckedEventsStoredOnceInOrder == \A i \in 1..Len(stored) - 1 : stored[i] < stored[i + 1]
\* A frame of a retired generation changes neither the queue nor the log (the spec has no such
\* frame: the Rust check sends one on every step it can).
RetiredSandboxNeverChangesQueue == [][UNCHANGED <<queue, running>> \/ gen' >= gen]_vars
\* One provider failure ends at most the one prompt it was for.
FailedSpawnFailsOnePrompt == [][Refused => Len(queue') = Len(queue)]_vars
\* Bounded response, the checkable form of "a running prompt always ends": at the alarm after a
\* silent sandbox's deadline, its prompt has ended or moved to a new generation.
SilentSandboxEndsWithinDeadline == [][(Lose /\ running # NoPrompt) => (running' = NoPrompt \/ gen' > gen)]_vars
=============================================================================
