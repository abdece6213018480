--------------------------- MODULE GitSyncGating ---------------------------
\* Design notes, not a checked artefact: nothing runs TLC or Apalache on this file. What runs is
\* core/tests/model_git_sync_gating.rs, an exhaustive bounded exploration of the production core types;
\* core/tests/specs_match_checks.rs keeps the property names below and its checks in step.
(* Read-before-sync with blocked writes. The agent may read from the moment   *)
(* it starts; tools that can change files (write, edit, patch, bash, ...)     *)
(* are refused with an explanation until the checkout has synced to the       *)
(* latest base branch. Checked against core/src/gating.rs by                  *)
(* core/tests/model_git_sync_gating.rs (bounded exhaustive exploration).      *)
EXTENDS Naturals

CONSTANTS Tools, WriteTools, Commits

VARIABLES sync,     \* "not_started" | "syncing" | "synced" | "failed"
          commit,   \* the synced commit, or "none"
          wrote,    \* a write has been allowed
          last      \* the last decision: [tool, allowed, synced]

vars == <<sync, commit, wrote, last>>

Init == sync = "not_started" /\ commit = "none" /\ wrote = FALSE
        /\ last = [tool |-> "none", allowed |-> TRUE, synced |-> FALSE]

StartSync == /\ ~wrote /\ sync # "syncing"
             /\ sync' = "syncing" /\ UNCHANGED <<commit, wrote, last>>
Synced(c) == /\ sync = "syncing" /\ sync' = "synced" /\ commit' = c
             /\ UNCHANGED <<wrote, last>>
Fail == /\ sync = "syncing" /\ sync' = "failed" /\ UNCHANGED <<commit, wrote, last>>

Use(t) == LET ok == t \notin WriteTools \/ sync = "synced"
          IN /\ last' = [tool |-> t, allowed |-> ok, synced |-> sync = "synced"]
             /\ wrote' = (wrote \/ (ok /\ t \in WriteTools))
             /\ UNCHANGED <<sync, commit>>

Next == StartSync \/ Fail \/ (\E c \in Commits : Synced(c)) \/ (\E t \in Tools : Use(t))
Spec == Init /\ [][Next]_vars

\* Checked by core/tests/model_git_sync_gating.rs: every definition from here on is asserted there under
\* the same name (invariants in every state reached, [][...]_vars properties on every step).

ReadsNeverBlocked == last.tool \notin WriteTools => last.allowed
NoWriteBeforeSync == (last.tool \in WriteTools /\ last.allowed) => last.synced
NoResyncAfterWrite == wrote => sync = "synced"
\* Rust only: BlockedWritesExplain. (A blocked call's message names the tool and says why: the
\* spec's decision record has no message.)
SyncedCheckoutStable == [][(wrote /\ sync = "synced") => (sync' = "synced" /\ commit' = commit)]_vars
=============================================================================
