//! `sollol generate`: one prompt in, generated text streamed to stdout, a
//! one-line summary on stderr.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use sollol::head::chat::{ChatTemplate, Message, CHATML};
use sollol::head::engine::LocalEngine;
use sollol::head::generation::{generate, GenerateRequest};

use super::{load_slice, open_model, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// The prompt.
    prompt: String,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut opened = open_model(&args.model.model)?;
    let tokenizer = opened.tokenizer()?;
    let text = if args.chat {
        let fallback;
        let template = match tokenizer.chat_template() {
            Some(t) => t,
            None => {
                fallback = ChatTemplate::new(CHATML, "", "")?;
                &fallback
            }
        };
        template.render(&[Message::new("user", &args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text)?;
    let slice = load_slice(&mut opened.file, None)?;
    let mut engine = LocalEngine::new(slice)?;
    let req = GenerateRequest {
        prompt,
        params: args.sampling.params(0.0),
        max_tokens: args.sampling.max_tokens,
        stop: args.sampling.stop.clone(),
        context: args.sampling.ctx,
    };
    let mut stdout = std::io::stdout().lock();
    let result = generate(&mut engine, &tokenizer, 1, &req, &mut |piece| {
        // A closed pipe (`| head`) cancels the generation instead of failing it.
        stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush()).is_ok()
    })?;
    let _ = writeln!(stdout);
    eprintln!("{}", result.stats.summary());
    Ok(())
}
