//! Test harness: starts wrangler dev on free ports and talks to it.
