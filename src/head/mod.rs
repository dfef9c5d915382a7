//! The head: tokenizer, chat template, sampling and the generation loop.
//!
//! Architecture invariant: the head never touches weights or activations; it
//! talks to an [`engine::Engine`] in token ids and sampling parameters.

pub mod chat;
pub mod client;
pub mod constraint;
pub mod conversations;
pub mod engine;
pub mod generation;
pub mod pipeline;
pub mod queue;
pub mod tokenizer;
pub mod tools;
