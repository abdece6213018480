\* WarmPool: the warm pool of one repository (core/src/pool.rs), checked by core/tests/model_warm_pool.rs.
------------------------------ MODULE WarmPool ------------------------------
(* Ready sandboxes from the latest image, claimed by sessions at once,        *)
(* refilled by (possibly duplicated) alarms and drained when the image       *)
(* changes or the pool shrinks. The shell records a sandbox as requested     *)
(* before it asks the provider, so a repeated alarm plans nothing twice.     *)
(*                                                                           *)
(* Bound of the Rust check (core/tests/model_warm_pool.rs): Sessions =       *)
(* {ses_a, ses_b}, Images = {img_1, img_2} starting from no image, targets   *)
(* 0..2 starting at 1, at most 4 sandbox ids, every sequence of up to 8      *)
(* actions (keys are bounded by the depth). Stale and duplicated provider    *)
(* callbacks are explored for every key ever planned. History variables     *)
(* below are the test's ghost state; invariants and step properties carry    *)
(* the same names there.                                                     *)
EXTENDS Naturals, FiniteSets

CONSTANTS Sessions, Images, MaxTarget, MaxKeys, Sandboxes

NoImage == "no_image"          \* a plain clone: the repository has no image yet
NoSbx == "no_sandbox"          \* requested, the provider has not answered yet
NoSession == "no_session"
Keys == 1..MaxKeys             \* stable names chosen when a sandbox is requested
Idle == {"requested", "booting", "ready"}
Slots == Idle \cup {"draining", "gone"}   \* "gone": no entry (never planned, claimed or removed)

VARIABLES target,     \* how many idle sandboxes to keep
          image,      \* the image new sandboxes come from
          slot,       \* [Keys -> Slots]
          sbx,        \* [Keys -> Sandboxes \cup {NoSbx}]
          img,        \* [Keys -> Images \cup {NoImage}]
          nextKey,    \* keys 1..nextKey have been planned
          claims,     \* [Sessions -> Sandboxes \cup {NoSbx}]: the sandbox handed to each session
          \* History (ghost) variables:
          created,    \* sandboxes the provider created
          sbxImage,   \* [Sandboxes -> Images \cup {NoImage}]: image of the key each was created for
          handed,     \* [Sandboxes -> Sessions \cup {NoSession}]: to whom each was ever handed out
          released,   \* sandboxes whose entry was removed as lost or drained
          terminated, \* sandboxes the pool asked the shell to terminate
          drainedSbx, \* sandboxes that were ever in a draining entry
          shared,     \* a claim handed out a sandbox already handed to another session
          stale       \* a claim handed out a sandbox not of the image current at claim time

pool == <<target, image, slot, sbx, img, nextKey, claims>>
ghost == <<created, sbxImage, handed, released, terminated, drainedSbx, shared, stale>>
vars == <<pool, ghost>>

IdleKeys(sl) == {k \in Keys : sl[k] \in Idle}
Deficit(sl, tg) == IF Cardinality(IdleKeys(sl)) < tg THEN tg - Cardinality(IdleKeys(sl)) ELSE 0
Warm == {k \in Keys : slot[k] = "ready" /\ img[k] = image}
SandboxesOf(D) == {sbx[k] : k \in D} \ {NoSbx}
PendingDrains == {<<k, sbx[k]>> : k \in {j \in Keys : slot[j] = "draining" /\ sbx[j] # NoSbx}}

Init == /\ target \in 0..MaxTarget /\ image = NoImage
        /\ slot = [k \in Keys |-> "gone"] /\ sbx = [k \in Keys |-> NoSbx]
        /\ img = [k \in Keys |-> NoImage] /\ nextKey = 0
        /\ claims = [s \in Sessions |-> NoSbx]
        /\ created = {} /\ sbxImage = [s \in Sandboxes |-> NoImage]
        /\ handed = [s \in Sandboxes |-> NoSession]
        /\ released = {} /\ terminated = {} /\ drainedSbx = {}
        /\ shared = FALSE /\ stale = FALSE

\* Plans the missing idle sandboxes, each recorded as requested before any I/O.
Refill == LET n == Deficit(slot, target)
              New == {k \in Keys : nextKey < k /\ k <= nextKey + n}
          IN /\ n > 0 /\ nextKey + n <= MaxKeys
             /\ slot' = [k \in Keys |-> IF k \in New THEN "requested" ELSE slot[k]]
             /\ img' = [k \in Keys |-> IF k \in New THEN image ELSE img[k]]
             /\ nextKey' = nextKey + n
             /\ UNCHANGED <<target, image, sbx, claims, ghost>>

\* The provider accepted the create of key k as sandbox s (a fresh id). A key drained while
\* its create was in flight keeps draining and now owes a terminate.
Created(k, s) == /\ s \notin created
                 /\ \/ slot[k] = "requested" /\ slot' = [slot EXCEPT ![k] = "booting"]
                    \/ slot[k] = "draining" /\ sbx[k] = NoSbx /\ UNCHANGED slot
                 /\ sbx' = [sbx EXCEPT ![k] = s]
                 /\ created' = created \cup {s}
                 /\ sbxImage' = [sbxImage EXCEPT ![s] = img[k]]
                 /\ drainedSbx' = IF slot[k] = "draining" THEN drainedSbx \cup {s} ELSE drainedSbx
                 /\ UNCHANGED <<target, image, img, nextKey, claims>>
                 /\ UNCHANGED <<handed, released, terminated, shared, stale>>

Booted(k) == /\ slot[k] = "booting" /\ slot' = [slot EXCEPT ![k] = "ready"]
             /\ UNCHANGED <<target, image, sbx, img, nextKey, claims, ghost>>

Remove(k) == /\ slot' = [slot EXCEPT ![k] = "gone"] /\ sbx' = [sbx EXCEPT ![k] = NoSbx]
             /\ released' = released \cup SandboxesOf({k})
             /\ UNCHANGED <<target, image, img, nextKey, claims>>
             /\ UNCHANGED <<created, sbxImage, handed, terminated, drainedSbx, shared, stale>>

\* The create failed or the pooled sandbox died.
Lost(k) == slot[k] # "gone" /\ Remove(k)
\* A draining sandbox has been terminated.
Drained(k) == slot[k] = "draining" /\ Remove(k)

\* A session without a sandbox takes a ready one of the current image; asking again answers
\* the same sandbox (a stutter); with nothing warm the caller starts one cold (a stutter).
Claim(ses) == /\ claims[ses] = NoSbx
              /\ \E k \in Warm :
                   LET s == sbx[k] IN
                   /\ slot' = [slot EXCEPT ![k] = "gone"]
                   /\ sbx' = [sbx EXCEPT ![k] = NoSbx]
                   /\ claims' = [claims EXCEPT ![ses] = s]
                   /\ shared' = (shared \/ handed[s] \notin {NoSession, ses})
                   /\ handed' = [handed EXCEPT ![s] = ses]
                   /\ stale' = (stale \/ sbxImage[s] # image)
              /\ UNCHANGED <<target, image, img, nextKey>>
              /\ UNCHANGED <<created, sbxImage, released, terminated, drainedSbx>>

\* The handover failed: the session may claim again; the sandbox is not reused.
Unclaim(ses) == /\ claims[ses] # NoSbx /\ claims' = [claims EXCEPT ![ses] = NoSbx]
                /\ UNCHANGED <<target, image, slot, sbx, img, nextKey, ghost>>

Drain(D) == /\ slot' = [k \in Keys |-> IF k \in D THEN "draining" ELSE slot[k]]
            /\ terminated' = terminated \cup SandboxesOf(D)
            /\ drainedSbx' = drainedSbx \cup SandboxesOf(D)
            /\ UNCHANGED <<sbx, img, nextKey, claims>>
            /\ UNCHANGED <<created, sbxImage, handed, released, shared, stale>>

\* A new image is ready: idle sandboxes of any other image drain.
NewImage(i) == /\ image' = i
               /\ Drain({k \in Keys : slot[k] \in Idle /\ img[k] # i})
               /\ UNCHANGED target

\* A new size: shrinking drains the surplus, requested before booting before ready.
Rank(sl) == CASE sl = "requested" -> 0 [] sl = "booting" -> 1 [] OTHER -> 2
Resize(n) == LET I == IdleKeys(slot)
                 m == IF Cardinality(I) > n THEN Cardinality(I) - n ELSE 0
             IN \E D \in SUBSET I :
                  /\ Cardinality(D) = m
                  /\ \A d \in D, k \in I \ D : Rank(slot[d]) <= Rank(slot[k])
                  /\ target' = n
                  /\ Drain(D)
                  /\ UNCHANGED image

Next == \/ Refill
        \/ \E k \in Keys, s \in Sandboxes : Created(k, s)
        \/ \E k \in Keys : Booted(k) \/ Lost(k) \/ Drained(k)
        \/ \E ses \in Sessions : Claim(ses) \/ Unclaim(ses)
        \/ \E i \in Images : NewImage(i)
        \/ \E n \in 0..MaxTarget : Resize(n)

Spec == Init /\ [][Next]_vars

\* A sandbox handed out is never handed to another session, even after an unclaim.
NeverTwoSessionsOnOneSandbox ==
    /\ ~shared
    /\ \A a, b \in Sessions : (a # b /\ claims[a] # NoSbx) => claims[a] # claims[b]
    /\ \A ses \in Sessions : claims[ses] # NoSbx =>
          /\ handed[claims[ses]] = ses
          /\ \A k \in Keys : sbx[k] # claims[ses]
\* Idle (non-draining) entries never exceed the target.
PoolBound == Cardinality(IdleKeys(slot)) <= target
\* Every claim hands out a sandbox of the image current at claim time; idle ones are all current.
NoOldImageHandedOut == ~stale /\ \A k \in IdleKeys(slot) : img[k] = image
\* A sandbox that was ever draining (or told to terminate) is never handed out.
DrainedNeverClaimed == \A s \in Sandboxes : handed[s] # NoSession => s \notin drainedSbx \cup terminated
\* With a ready sandbox of the current image pooled, a session without one is never sent cold.
ClaimTakesWarm == \A ses \in Sessions : (claims[ses] = NoSbx /\ Warm # {}) => ENABLED Claim(ses)
\* The terminate of every existing draining sandbox is owed until it is drained (safe to repeat).
DrainsOwed == \A k \in Keys : (slot[k] = "draining" /\ sbx[k] # NoSbx) => <<k, sbx[k]>> \in PendingDrains
\* Every created sandbox is pooled, handed out, or was removed as terminated or dead.
NoSandboxLeaked ==
    /\ \A s \in created : (\E k \in Keys : sbx[k] = s) \/ handed[s] # NoSession \/ s \in released
    /\ \A k \in Keys : slot[k] = "requested" => sbx[k] = NoSbx
    /\ \A k \in Keys : slot[k] \in {"booting", "ready"} => sbx[k] # NoSbx

\* Idempotent alarms: a refill immediately repeated plans nothing.
RefillIdempotent == [][Refill => Deficit(slot', target') = 0]_vars
\* Refills plan only keys never planned before.
RefillPlansFreshKeys == [][Refill => \A k \in Keys : (slot'[k] = "requested" /\ slot[k] # "requested") => k > nextKey]_vars
\* A draining sandbox never becomes requested, booting or ready (claimable) again.
DrainingIsFinal == [][\A k \in Keys : slot[k] = "draining" => slot'[k] \in {"draining", "gone"}]_vars
\* A key once removed never comes back.
RemovedKeysStayRemoved == [][\A k \in Keys : (k <= nextKey /\ slot[k] = "gone") => slot'[k] = "gone"]_vars
=============================================================================
