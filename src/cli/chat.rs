//! `sollol chat`: an interactive REPL over the model's chat template.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use sollol::head::chat::Message;
use sollol::head::generation::{generate, GenerateRequest};

use super::generate::{print_summary, start_engine, PipelineArgs};
use super::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// A system prompt to start the conversation with.
    #[arg(long)]
    system: Option<String>,
}

pub fn run(args: ChatArgs, threads: usize) -> Result<()> {
    let mut opened = args.model.open()?;
    let tokenizer = opened.tokenizer()?;
    let mut running = start_engine(&mut opened, &args.pipeline, threads)?;
    let mut messages: Vec<Message> = args.system.iter().map(|s| Message::new("system", s)).collect();
    eprintln!("chatting with {} — empty line or Ctrl-D to quit, /reset to start over", opened.resolved.name);
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if line == "/reset" {
            messages.retain(|m| m.role == "system");
            continue;
        }
        messages.push(Message::new("user", line));
        let prompt = tokenizer.encode(&tokenizer.render_chat(&messages, &[])?)?;
        let mut params = args.sampling.params(0.7);
        params.seed = params.seed.wrapping_add(turn);
        let req = GenerateRequest {
            prompt,
            params,
            max_tokens: args.sampling.max_tokens,
            stop: args.sampling.stop.clone(),
            context: args.sampling.ctx,
            resume: None,
            keep_session: false,
            logprobs: None,
            format: None,
        };
        let mut stdout = std::io::stdout().lock();
        let result = generate(running.engine.as_mut(), &tokenizer, rand::random(), &req, &mut |piece| {
            stdout.write_all(piece.text.as_bytes()).and_then(|_| stdout.flush()).is_ok()
        });
        let _ = writeln!(stdout);
        match result {
            Ok(r) => {
                print_summary(&r);
                messages.push(Message::new("assistant", &r.text));
            }
            Err(e) => {
                // The conversation goes on; the failed turn is dropped.
                eprintln!("error: {e}");
                messages.pop();
            }
        }
        turn += 1;
    }
    Ok(())
}
