//! Nightshift's compute side: the local provider, the in-sandbox supervisor and the scripted model.

pub mod cgroup;
pub mod egress;
pub mod images;
pub mod procs;
pub mod provider;
pub mod scripted;
pub mod socket_path;
pub mod supervisor;
