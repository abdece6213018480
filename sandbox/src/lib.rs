//! Nightshift's compute side: the local provider, the in-sandbox supervisor and the scripted model.

// Requests, socket frames and files from sandboxes arrive here: a bad one is an error, never a
// panic. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod boot;
pub mod cgroup;
pub mod egress;
pub mod images;
pub mod procs;
pub mod provider;
pub mod scripted;
pub mod socket_path;
pub mod state;
pub mod supervisor;
