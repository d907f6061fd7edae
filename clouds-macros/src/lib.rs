//! The `#[clouds::service]` attribute macro.
//!
//! Use it through the `clouds` crate, which re-exports it as `clouds::service`, documents it,
//! and provides the runtime that the generated code calls (`::clouds::__private`).
//!
//! # Layout
//!
//! The macro works in three steps, one module each:
//!
//! - `ast`: the model. Reads the attribute and the trait into `ServiceName`, `Service`,
//!   `Method`, `Arg` and `ReturnKind`, borrowing the syntax tree and recording everything, even
//!   what is not supported.
//! - `valid`: the checks. Every unsupported construct becomes an error on its own token, and all
//!   errors are reported together.
//! - `expand`: the output. The trait with `Send` futures, `{Trait}Client` and `{Trait}Server<T>`.

use proc_macro::TokenStream;

mod ast;
mod expand;
mod valid;

/// Turns a trait into a remote service: a client stub and a server that dispatches to an
/// implementation. See `clouds::service` for the documentation and examples.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    expand(item.clone(), expand::service(attr.into(), item)).into()
}

/// Turns the outcome of an expansion into tokens. On error the trait is emitted unchanged beside
/// the errors: code that names it still resolves, so one mistake gives one error, not twenty.
fn expand(
    item: proc_macro2::TokenStream,
    result: syn::Result<proc_macro2::TokenStream>,
) -> proc_macro2::TokenStream {
    result.unwrap_or_else(|error| {
        let mut tokens = expand::without_options(item);
        tokens.extend(error.into_compile_error());
        tokens
    })
}

#[cfg(test)]
mod tests {
    use quote::quote;

    #[test]
    fn errors_keep_the_trait() {
        let item = quote! {
            trait X {
                fn a(&self);
            }
        };
        let tokens = super::expand(
            item.clone(),
            super::expand::service(quote!("x"), item.clone()),
        );
        let error = quote! {
            ::core::compile_error! { "a service method must be `async fn`: write `async fn a`" }
        };
        assert_eq!(tokens.to_string(), quote!(#item #error).to_string());
    }
}
