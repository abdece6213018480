"""Images (build, failures, logs, sandboxes from them) and snapshots (create, get, restore, expiry, delete) over HTTP on the fake Modal."""

from __future__ import annotations

import subprocess
from typing import Any

from nightshift_modal.backend import JOB_GRACE_MS

from .harness import ProviderTestCase, sse_data


class ImageTest(ProviderTestCase):
    def build(self, **fields: Any) -> dict[str, Any]:
        r = self.c.post("/v1/images", {"repository": {"clone_url": str(self.h.repo), "base_branch": "main"}, **fields})
        self.assertEqual(r.status, 201, r.body)
        return r.json()

    def test_a_build_runs_setup_and_test_and_becomes_an_image(self) -> None:
        created = self.build(
            setup=["echo built > built.txt", "echo warm > $HOME/cache.txt"],
            test="echo testing; exit 3",
            labels={"pool": "demo"},
        )
        self.assertTrue(created["id"].startswith("img_"))
        self.assertEqual(
            {k: created[k] for k in ("status", "commit", "ready_at", "test_exit_code", "error")},
            {"status": "building", "commit": None, "ready_at": None, "test_exit_code": None, "error": None},
        )
        image = self.h.wait(f"/v1/images/{created['id']}", ("ready", "failed"))
        self.assertEqual(image["status"], "ready", image)
        self.assertEqual([sb for sb in self.h.fake.sandboxes.values() if sb.running], [])
        head = subprocess.run(
            ["git", "-C", str(self.h.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.assertEqual((image["commit"], image["test_exit_code"], image["labels"]), (head, 3, {"pool": "demo"}))
        self.assertEqual(image["setup"], ["echo built > built.txt", "echo warm > $HOME/cache.txt"])
        log = sse_data(self.c.get(f"/v1/images/{created['id']}/logs").body)
        for line in (
            "$ git clone --branch main " + str(self.h.repo),
            f"at {head}",
            "$ echo built > built.txt",
            "testing",
            "tests exited with 3 (recorded; the image is kept)",
            "image ready",
        ):
            self.assertIn(line, log)

        s = self.h.ready_sandbox(image=created["id"])
        self.assertEqual(s["image"], created["id"])
        self.assertEqual(self.h.exec(s["id"], "cat", "built.txt", "../home/cache.txt")["stdout"], "built\nwarm\n")

    def test_build_failures(self) -> None:
        missing = str(self.h.tmp / "missing")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"setup": ["true", "echo broken >&2; exit 4", "echo never"]}, "setup_failed"),
            ({"setup": ["sleep 5"], "timeout_ms": 300}, "timeout"),
            ({"repository": {"clone_url": missing}}, "repository_not_found"),
            ({"repository": {"clone_url": str(self.h.repo), "base_branch": "nope"}}, "clone_failed"),
        ]
        ids = [self.build(**fields)["id"] for fields, _ in cases]
        for image_id, (_, code) in zip(ids, cases, strict=True):
            with self.subTest(code=code):
                image = self.h.wait(f"/v1/images/{image_id}", ("ready", "failed"))
                self.assertEqual((image["status"], image["error"]["code"]), ("failed", code), image)
                log = sse_data(self.c.get(f"/v1/images/{image['id']}/logs").body)
                self.assertIn(f"build failed: {image['error']['message']}", log)
                if code == "setup_failed":
                    self.assertIn("broken", log)
                    self.assertNotIn("$ echo never", log)
                r = self.c.post("/v1/sandboxes", self.h.create_body(image=image["id"]))
                self.assertEqual((r.status, r.code), (409, "image_not_ready"))
        self.assertEqual([sb for sb in self.h.fake.sandboxes.values() if sb.running], [])

    def test_a_building_image_is_not_ready_and_its_log_can_be_followed(self) -> None:
        image = self.build(setup=["sleep 0.3", "echo done"])
        r = self.c.post("/v1/sandboxes", self.h.create_body(image=image["id"]))
        self.assertEqual((r.status, r.code), (409, "image_not_ready"))
        followed = sse_data(self.c.get(f"/v1/images/{image['id']}/logs?follow=1").body)
        self.assertEqual(followed[-1], "image ready")
        self.assertIn("done", followed)
        self.assertEqual(self.c.get(f"/v1/images/{image['id']}").json()["status"], "ready")

    def test_a_build_whose_worker_died_fails_after_its_deadline(self) -> None:
        self.h.spawner.spawn = lambda job, target, generation: None  # type: ignore[method-assign]
        image = self.build(timeout_ms=1000)
        self.h.clock.advance(1000 + JOB_GRACE_MS + 1)
        image = self.c.get(f"/v1/images/{image['id']}").json()
        self.assertEqual((image["status"], image["error"]["code"]), ("failed", "timeout"))

    def test_delete_is_idempotent_and_frees_the_image(self) -> None:
        image = self.h.wait(f"/v1/images/{self.build()['id']}", ("ready",))
        ref = self.h.record(f"img:{image['id']}")["image_ref"]
        self.assertIsNone(self.h.fake.image_ttls[ref])
        for _ in range(2):
            r = self.c.delete(f"/v1/images/{image['id']}")
            self.assertEqual((r.status, r.json()), (200, {"id": image["id"], "deleted": True}))
        self.assertEqual(self.c.get(f"/v1/images/{image['id']}").code, "image_not_found")
        self.assertIn(ref, self.h.fake.deleted_images)
        r = self.c.post("/v1/sandboxes", self.h.create_body(image=image["id"]))
        self.assertEqual((r.status, r.code), (404, "image_not_found"))


class SnapshotTest(ProviderTestCase):
    def test_snapshot_restore_and_delete(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        self.h.exec(sid, "sh", "-c", "echo uncommitted > wip.txt")
        r = self.c.post(f"/v1/sandboxes/{sid}/snapshot")
        self.assertEqual(r.status, 201)
        snap = r.json()
        self.assertEqual(set(snap), {"id", "sandbox_id", "created_at", "expires_at"})
        self.assertTrue(snap["id"].startswith("snp_"))
        self.assertEqual((snap["sandbox_id"], snap["expires_at"]), (sid, snap["created_at"] + 30 * 24 * 3600 * 1000))
        self.assertEqual(self.c.get(f"/v1/snapshots/{snap['id']}").json(), snap)

        r = self.c.post(f"/v1/snapshots/{snap['id']}/restore", self.h.create_body(session_id="ses_2"))
        self.assertEqual(r.status, 201)
        self.assertEqual((r.json()["snapshot"], r.json()["session_id"]), (snap["id"], "ses_2"))
        (also,) = self.h.ready_sandboxes({"snapshot": snap["id"]})
        restored = self.h.wait(f"/v1/sandboxes/{r.json()['id']}", ("ready",))
        self.assertEqual(self.h.exec(restored["id"], "cat", "wip.txt")["stdout"], "uncommitted\n")
        self.assertIn("?? wip.txt", self.h.exec(restored["id"], "git", "status", "--porcelain")["stdout"])
        self.assertEqual(self.h.exec(also["id"], "cat", "wip.txt")["stdout"], "uncommitted\n")

        ref = self.h.record(f"snp:{snap['id']}")["image_ref"]
        self.assertEqual(self.h.fake.image_ttls[ref], 30 * 24 * 3600)
        for _ in range(2):
            r = self.c.delete(f"/v1/snapshots/{snap['id']}")
            self.assertEqual((r.status, r.json()), (200, {"id": snap["id"], "deleted": True}))
        self.assertEqual(self.c.get(f"/v1/snapshots/{snap['id']}").code, "snapshot_not_found")
        r = self.c.post(f"/v1/snapshots/{snap['id']}/restore", self.h.create_body())
        self.assertEqual((r.status, r.code), (404, "snapshot_not_found"))
        # The live sandboxes restored from it still hold its image; the last to end frees it.
        self.assertNotIn(ref, self.h.fake.deleted_images)
        self.c.post(f"/v1/sandboxes/{restored['id']}/terminate")
        self.assertNotIn(ref, self.h.fake.deleted_images)
        self.c.post(f"/v1/sandboxes/{also['id']}/terminate")
        self.assertIn(ref, self.h.fake.deleted_images)

    def test_snapshots_expire(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        kept = self.c.post(f"/v1/sandboxes/{sid}/snapshot", {"ttl_ms": 3_600_000}).json()
        short = self.c.post(f"/v1/sandboxes/{sid}/snapshot", {"ttl_ms": 1000}).json()
        self.assertEqual(short["expires_at"], short["created_at"] + 1000)
        refs = {s["id"]: self.h.record(f"snp:{s['id']}")["image_ref"] for s in (kept, short)}
        # Modal keeps each snapshot's image as long as the snapshot lives, and no longer.
        self.assertEqual([self.h.fake.image_ttls[refs[s["id"]]] for s in (kept, short)], [3600, 1])
        self.h.clock.advance(2000)
        self.assertEqual(self.c.get(f"/v1/snapshots/{short['id']}").code, "snapshot_not_found")
        r = self.c.post(f"/v1/snapshots/{short['id']}/restore", self.h.create_body())
        self.assertEqual((r.status, r.code), (404, "snapshot_not_found"))
        self.assertIn(refs[short["id"]], self.h.fake.deleted_images)
        self.assertEqual(self.c.get(f"/v1/snapshots/{kept['id']}").status, 200)
        self.h.clock.advance(3_600_000)
        self.h.backend.sweep()
        self.assertIsNone(self.h.store.get(f"snp:{kept['id']}"))
        self.assertIn(refs[kept["id"]], self.h.fake.deleted_images)

    def test_a_stopped_sandbox_snapshots_its_kept_disk(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        self.h.exec(sid, "sh", "-c", "echo before-stop > wip.txt")
        self.c.post(f"/v1/sandboxes/{sid}/stop")
        snap = self.c.post(f"/v1/sandboxes/{sid}/snapshot").json()
        restored = self.h.ready_sandbox(snapshot=snap["id"])
        self.assertEqual(self.h.exec(restored["id"], "cat", "wip.txt")["stdout"], "before-stop\n")
        # The stopped sandbox and the snapshot share one image: ending one keeps it for the other.
        ref = self.h.record(f"snp:{snap['id']}")["image_ref"]
        self.assertIsNone(self.h.fake.image_ttls[ref])
        self.c.post(f"/v1/sandboxes/{sid}/terminate")
        self.c.post(f"/v1/sandboxes/{restored['id']}/terminate")
        self.assertNotIn(ref, self.h.fake.deleted_images)
        self.c.delete(f"/v1/snapshots/{snap['id']}")
        self.assertIn(ref, self.h.fake.deleted_images)

    def test_a_snapshot_needs_a_running_or_stopped_sandbox(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        self.c.post(f"/v1/sandboxes/{sid}/terminate")
        r = self.c.post(f"/v1/sandboxes/{sid}/snapshot")
        self.assertEqual((r.status, r.code), (409, "sandbox_terminated"))
        slow = self.c.post("/v1/sandboxes", self.h.create_body(repository={"clone_url": str(self.h.tmp / "none")}))
        failed = self.h.wait(f"/v1/sandboxes/{slow.json()['id']}", ("failed",))
        r = self.c.post(f"/v1/sandboxes/{failed['id']}/snapshot")
        self.assertEqual((r.status, r.code), (409, "sandbox_terminated"))
