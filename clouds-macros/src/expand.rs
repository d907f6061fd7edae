//! Generation: the rewritten trait, `{Trait}Client` and `{Trait}Server<T>`, one function each.
//!
//! Everything the generated code names outside the user's own tokens goes through an absolute
//! path (`::core`, `::std`, `::clouds`), so it compiles under `#![no_implicit_prelude]` and next
//! to user items called `Result`, `Vec`, `str`, ...

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote};
use syn::{
    Attribute, Ident, Item, TraitItem, TraitItemFn, ext::IdentExt, parse_quote, parse_quote_spanned,
};

use crate::ast::{Method, ReturnKind, Service, ServiceName};
use crate::valid::{self, Errors};

/// Parses, validates and generates; any error leaves generation to the caller's error path.
pub(crate) fn service(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    // Parsed as any item first: a trait syn cannot parse keeps syn's own error and span.
    let Item::Trait(item) = syn::parse2(item)? else {
        return Err(syn::Error::new(
            Span::call_site(),
            "`#[clouds::service]` can only be applied to a trait",
        ));
    };
    let service = Service::from_syn(&item);
    let name = ServiceName::from_attr(attr);

    let mut errors = Errors::default();
    match &name {
        Ok(name) => {
            valid::check_name(name, &mut errors);
            valid::check_wire_names(name, &service, &mut errors);
        }
        Err(error) => errors.push(error.clone()),
    }
    valid::check_service(&service, &mut errors);
    errors.finish()?;
    let name = name?;
    if valid::left_to_compiler(&service) {
        return Ok(without_options(item.into_token_stream()));
    }

    let generator = Generator::new(&service, &name);
    let trait_def = generator.trait_def();
    let client = generator.client_struct();
    let server = generator.server_struct();
    Ok(quote! {
        #trait_def
        #client
        #server
    })
}

/// What the generated items share; built once the service is known to be valid.
struct Generator<'a> {
    service: &'a Service<'a>,
    /// The service name, the prefix of every wire name.
    name: String,
    client: Ident,
    server: Ident,
    /// The server's type parameter: `T`, unless the trait's own tokens mention a `T` that the
    /// parameter would shadow.
    param: Ident,
    /// The server's local handle on the implementation. Mixed-site hygiene keeps it apart from
    /// parameters the user may have named `inner`.
    inner: Ident,
    /// The trait's `#[cfg]` attributes: the generated items exist exactly when the trait does.
    cfgs: Vec<&'a Attribute>,
}

impl<'a> Generator<'a> {
    fn new(service: &'a Service<'a>, name: &ServiceName) -> Self {
        let ident = service.ident();
        let param = if mentions(service.item.to_token_stream(), "T") {
            Ident::new("__CloudsImpl", Span::call_site())
        } else {
            Ident::new("T", Span::call_site())
        };
        Self {
            service,
            name: name.value(),
            client: format_ident!("{}Client", ident, span = ident.span()),
            server: format_ident!("{}Server", ident, span = ident.span()),
            param,
            inner: Ident::new("__clouds_inner", Span::mixed_site()),
            cfgs: cfg_attrs(&service.item.attrs),
        }
    }

    /// The trait with each `async fn` turned into `fn .. -> impl Future<Output = R> + Send`:
    /// implementors still write `async fn`, and the compiler checks that their futures are
    /// `Send`, which the server needs to run them on a multi-threaded runtime.
    fn trait_def(&self) -> TokenStream {
        let mut item = self.service.item.clone();
        // `#[clouds(..)]` options are the macro's: the compiler knows no such attribute.
        item.items = self
            .service
            .methods
            .iter()
            .map(|method| TraitItem::Fn(trait_method(method)))
            .collect();
        item.into_token_stream()
    }

    fn client_struct(&self) -> TokenStream {
        let Self {
            client, cfgs, name, ..
        } = self;
        let vis = &self.service.item.vis;
        let doc = format!(
            "Client stub for [`{}`]: calls the `{name}` service's methods on remote providers.",
            self.service.ident().unraw()
        );
        let methods = self
            .service
            .methods
            .iter()
            .map(|method| self.client_method(method));
        quote! {
            #(#cfgs)*
            #[doc = #doc]
            #[derive(::core::clone::Clone, ::core::fmt::Debug)]
            // A private service may use only one side; the other must not warn.
            #[allow(dead_code)]
            #vis struct #client {
                inner: ::clouds::__private::Stub,
            }

            #(#cfgs)*
            #[allow(dead_code)]
            impl #client {
                /// Creates a stub that calls through `client`.
                #vis fn new(client: &::clouds::Client) -> Self {
                    Self { inner: ::clouds::__private::Stub::new(client) }
                }

                /// Retries each call up to `retries` more times on timeout, overload or no provider.
                #vis fn with_retries(self, retries: ::core::primitive::u32) -> Self {
                    Self { inner: self.inner.with_retries(retries) }
                }

                /// Per-attempt timeout for calls made through this stub (overrides the config's).
                #vis fn with_timeout(self, timeout: ::core::time::Duration) -> Self {
                    Self { inner: self.inner.with_timeout(timeout) }
                }

                #(#methods)*
            }
        }
    }

    /// One client method: same name, attributes and documentation as the trait method, the
    /// arguments sent as a tuple, transport failures in the outer `Result`.
    fn client_method(&self, method: &Method<'_>) -> TokenStream {
        let vis = &self.service.item.vis;
        let attrs = method.plain_attrs();
        let ident = method.ident();
        let wire = method.wire_name(&self.name);
        // Undocumented trait methods still give documented client methods, so `missing_docs`
        // warns once, on the trait, not again on generated code.
        let fallback_doc = (!attrs.iter().any(|attr| attr.path().is_ident("doc"))).then(|| {
            let doc = format!(
                "Calls [`{}::{}`] on a provider of the `{}` service.",
                self.service.ident().unraw(),
                ident.unraw(),
                self.name
            );
            quote!(#[doc = #doc])
        });
        let params = method.args.iter().map(|arg| {
            let name = arg_ident(arg);
            if arg.text {
                quote!(#name: impl ::core::convert::AsRef<::core::primitive::str>)
            } else {
                let ty = arg.ty;
                quote!(#name: #ty)
            }
        });
        // `&str` and `String` have the same MessagePack form: send text without copying it.
        let values = method.args.iter().map(|arg| {
            let name = arg_ident(arg);
            if arg.text {
                quote!(::core::convert::AsRef::<::core::primitive::str>::as_ref(&#name))
            } else {
                quote!(#name)
            }
        });
        // A method marked once keeps one call id across its attempts (`Client::call_once`).
        let (result, value) = if method.once() {
            (quote!(call_result_once), quote!(call_value_once))
        } else {
            (quote!(call_result), quote!(call_value))
        };
        let (output, call) = match &method.ret {
            ReturnKind::Stream {
                result: Some((ok, err)),
                ..
            } => (
                quote!(::clouds::ItemStream<::core::result::Result<#ok, #err>>),
                quote!(open_stream_result::<_, #ok, #err>),
            ),
            ReturnKind::Stream { item, .. } => (
                quote!(::clouds::ItemStream<#item>),
                quote!(open_stream::<_, #item>),
            ),
            ReturnKind::Result { ok, err, .. } => (
                quote!(::core::result::Result<#ok, #err>),
                quote!(#result::<_, #ok, #err>),
            ),
            other => {
                let ty = other.ty();
                (quote!(#ty), quote!(#value::<_, #ty>))
            }
        };
        quote! {
            #(#attrs)*
            #fallback_doc
            #vis async fn #ident(&self #(, #params)*)
                -> ::core::result::Result<#output, ::clouds::Error>
            {
                self.inner.#call(#wire, &(#(#values,)*)).await
            }
        }
    }

    fn server_struct(&self) -> TokenStream {
        let Self {
            server,
            param,
            inner,
            cfgs,
            ..
        } = self;
        let vis = &self.service.item.vis;
        let trait_ident = self.service.ident();
        let doc = format!(
            "Serves [`{}`] by dispatching calls to an implementation; pass it to `Server::serve`.",
            trait_ident.unraw()
        );
        let body = if self.service.methods.is_empty() {
            quote!(::std::vec::Vec::new())
        } else {
            let routes = Ident::new("__clouds_routes", Span::mixed_site());
            let pushes = self.service.methods.iter().map(|method| {
                let cfgs = cfg_attrs(&method.item.attrs);
                let route = self.route(method);
                quote! {
                    #(#cfgs)*
                    #routes.push(#route);
                }
            });
            quote! {
                let #inner = self.inner;
                // `mut` is unused when `#[cfg]` removes every method.
                #[allow(unused_mut)]
                let mut #routes = ::std::vec::Vec::new();
                #(#pushes)*
                #routes
            }
        };
        quote! {
            #(#cfgs)*
            #[doc = #doc]
            #[derive(::core::fmt::Debug)]
            #[allow(dead_code)]
            #vis struct #server<#param> {
                inner: ::std::sync::Arc<#param>,
            }

            #(#cfgs)*
            #[allow(dead_code)]
            impl<#param> #server<#param> {
                /// Serves `inner`.
                #vis fn new(inner: #param) -> Self {
                    Self { inner: ::std::sync::Arc::new(inner) }
                }

                /// Serves an implementation that other code shares.
                #vis fn from_arc(inner: ::std::sync::Arc<#param>) -> Self {
                    Self { inner }
                }
            }

            // Not derived: cloning shares the implementation, so `T` need not be `Clone`.
            #(#cfgs)*
            impl<#param> ::core::clone::Clone for #server<#param> {
                fn clone(&self) -> Self {
                    Self { inner: ::core::clone::Clone::clone(&self.inner) }
                }
            }

            #(#cfgs)*
            impl<#param> ::clouds::Service for #server<#param>
            where
                #param: #trait_ident + ::core::marker::Send + ::core::marker::Sync + 'static,
            {
                // Deprecated methods are still served.
                #[allow(deprecated)]
                fn routes(self) -> ::std::vec::Vec<::clouds::Route> {
                    #body
                }
            }
        }
    }

    /// One route: decodes the argument tuple, calls the implementation through the trait (no
    /// method-resolution surprises from inherent methods of the same name), encodes the result.
    fn route(&self, method: &Method<'_>) -> TokenStream {
        let Self { inner, .. } = self;
        let trait_ident = self.service.ident();
        let ident = method.ident();
        let wire = method.wire_name(&self.name);
        let route = match method.ret {
            ReturnKind::Stream {
                result: Some(_), ..
            } => quote!(stream_result_route),
            ReturnKind::Stream { .. } => quote!(stream_route),
            ReturnKind::Result { .. } => quote!(result_route),
            _ => quote!(value_route),
        };
        let names: Vec<&Ident> = method.args.iter().map(arg_ident).collect();
        let tys = method.args.iter().map(|arg| arg.ty);
        // Marked once: recorded in Redis before it runs (`Route::once`).
        let once = method.once().then(|| quote!(.once()));
        quote! {
            {
                let #inner = ::core::clone::Clone::clone(&#inner);
                ::clouds::__private::#route(#wire, move |(#(#names,)*): (#(#tys,)*)| {
                    let #inner = ::core::clone::Clone::clone(&#inner);
                    async move { #trait_ident::#ident(&*#inner, #(#names),*).await }
                })#once
            }
        }
    }
}

/// `item` without the `#[clouds(..)]` options of its methods, which only this macro reads (the
/// compiler would report each as an unknown attribute); unchanged if it is not a trait.
pub(crate) fn without_options(item: TokenStream) -> TokenStream {
    match syn::parse2::<syn::ItemTrait>(item.clone()) {
        Ok(mut item) => {
            for trait_item in &mut item.items {
                if let TraitItem::Fn(method) = trait_item {
                    method.attrs.retain(|attr| !crate::ast::is_option(attr));
                }
            }
            item.into_token_stream()
        }
        Err(_) => item,
    }
}

/// A trait method with the `async` moved into its signature's return type.
fn trait_method(method: &Method<'_>) -> TraitItemFn {
    let mut item = method.item.clone();
    item.attrs.retain(|attr| !crate::ast::is_option(attr));
    let output = method.ret.ty();
    // Spanned on `async`: "required by this bound" notes for a non-`Send` implementation then
    // point at the method that asks for the future, not at the attribute.
    let span = item
        .sig
        .asyncness
        .take()
        .map_or_else(|| item.sig.ident.span(), |asyncness| asyncness.span);
    item.sig.output = parse_quote_spanned! {span=>
        -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
    };
    if let Some(block) = item.default.take() {
        // The block's future holds `&Self`, which is `Send` only when `Self: Sync`. The server
        // requires `Sync` anyway; implementations that override the method are unaffected.
        item.sig.generics.where_clause = Some(parse_quote!(where Self: ::core::marker::Sync));
        item.default = Some(parse_quote!({ async move #block }));
    }
    item
}

/// The name of a validated argument.
fn arg_ident<'a>(arg: &crate::ast::Arg<'a>) -> &'a Ident {
    // Validation rejected every argument that is not a plain binding.
    arg.ident
        .unwrap_or_else(|| unreachable!("argument patterns are validated"))
}

/// The `#[cfg(..)]` attributes among `attrs`.
fn cfg_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect()
}

/// Whether `tokens` contain the identifier `name` anywhere.
fn mentions(tokens: TokenStream, name: &str) -> bool {
    tokens.into_iter().any(|tree| match tree {
        TokenTree::Ident(ident) => ident == name,
        TokenTree::Group(group) => mentions(group.stream(), name),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::valid::messages;

    fn expand(attr: TokenStream, item: TokenStream) -> syn::File {
        let tokens = service(attr, item).expect("a valid service");
        syn::parse2(tokens).expect("the expansion parses as items")
    }

    fn hello() -> TokenStream {
        quote! {
            /// A greeter.
            pub trait Hello: Send {
                /// Greets someone.
                async fn hello(&self, name: String, mut msg: ::std::string::String) -> String;
                async fn div(&self, a: i64, b: i64) -> Result<i64, DivError>;
                async fn ping(&self);
                async fn one(&self, x: Vec<u8>) -> io::Result<u8>;
                async fn default_body(&self) -> u8 { self.ping().await; 1 }
            }
        }
    }

    fn text(tokens: impl ToTokens) -> String {
        tokens.to_token_stream().to_string()
    }

    #[test]
    fn once_methods_keep_their_call_id_and_route_once_and_lose_the_option() {
        let item = quote! {
            pub trait Pay {
                /// Charges.
                #[clouds(once)]
                async fn charge(&self, cents: u64) -> Result<String, String>;
                #[clouds(once)]
                async fn plain(&self) -> u8;
                async fn quote(&self) -> u8;
            }
        };
        let all = text(expand(quote!("pay"), item.clone()));
        assert!(!all.contains("clouds (once)"), "the option is gone: {all}");
        assert!(all.contains("call_result_once :: < _ , String , String > (\"pay.charge\""));
        assert!(all.contains("call_value_once :: < _ , u8 > (\"pay.plain\""));
        assert!(all.contains("call_value :: < _ , u8 > (\"pay.quote\""));
        assert_eq!(all.matches(". once ()").count(), 2, "{all}");
        assert!(all.contains("# [doc = r\" Charges.\"]"), "docs are kept");
        // An expansion that fails keeps the trait, without the options either.
        let kept = text(without_options(item));
        assert!(!kept.contains("clouds"), "{kept}");
    }

    #[test]
    fn emits_trait_client_and_server() {
        let file = expand(quote!("test"), hello());
        let names: Vec<String> = file
            .items
            .iter()
            .map(|item| match item {
                syn::Item::Trait(item) => format!("trait {}", item.ident),
                syn::Item::Struct(item) => format!("struct {}", item.ident),
                syn::Item::Impl(item) => format!(
                    "impl {}{}",
                    item.trait_
                        .as_ref()
                        .map(|(_, path, _)| format!("{} for ", text(path)))
                        .unwrap_or_default(),
                    text(&item.self_ty)
                ),
                other => text(other),
            })
            .collect();
        assert_eq!(
            names,
            [
                "trait Hello",
                "struct HelloClient",
                "impl HelloClient",
                "struct HelloServer",
                "impl HelloServer < T >",
                "impl :: core :: clone :: Clone for HelloServer < T >",
                "impl :: clouds :: Service for HelloServer < T >",
            ]
        );
    }

    #[test]
    fn rewrites_async_fns_with_send_futures() {
        let file = expand(quote!("test"), hello());
        let syn::Item::Trait(item) = &file.items[0] else {
            panic!("expected the trait first");
        };
        assert_eq!(text(&item.supertraits), "Send");
        assert!(text(&item.attrs[0]).contains("A greeter."));
        let TraitItem::Fn(hello) = &item.items[0] else {
            panic!("expected a method");
        };
        assert!(hello.sig.asyncness.is_none());
        assert!(text(&hello.attrs[0]).contains("Greets someone."));
        assert_eq!(
            text(&hello.sig.output),
            text(quote!(-> impl ::core::future::Future<Output = String> + ::core::marker::Send))
        );
        // Patterns stay as written in the trait.
        assert!(text(&hello.sig.inputs).contains("mut msg"));
        let TraitItem::Fn(ping) = &item.items[2] else {
            panic!("expected a method");
        };
        assert!(text(&ping.sig.output).contains("Output = ()"));
        let TraitItem::Fn(default_body) = &item.items[4] else {
            panic!("expected a method");
        };
        assert_eq!(
            text(&default_body.sig.generics.where_clause),
            text(quote!(where Self: ::core::marker::Sync))
        );
        assert!(text(&default_body.default).starts_with("{ async move {"));
    }

    #[test]
    fn client_methods_send_tuples() {
        let file = expand(quote!("test"), hello());
        let client = text(&file.items[2]);
        let expected = [
            // `String` taken as `impl AsRef<str>`, `mut` dropped, sent as a tuple of `&str`.
            quote! {
                pub async fn hello(
                    &self,
                    name: impl ::core::convert::AsRef<::core::primitive::str>,
                    msg: impl ::core::convert::AsRef<::core::primitive::str>
                ) -> ::core::result::Result<String, ::clouds::Error> {
                    self.inner.call_value::<_, String>(
                        "test.hello",
                        &(
                            ::core::convert::AsRef::<::core::primitive::str>::as_ref(&name),
                            ::core::convert::AsRef::<::core::primitive::str>::as_ref(&msg),
                        )
                    ).await
                }
            },
            quote! {
                pub async fn div(&self, a: i64, b: i64)
                    -> ::core::result::Result<::core::result::Result<i64, DivError>, ::clouds::Error>
                {
                    self.inner.call_result::<_, i64, DivError>("test.div", &(a, b,)).await
                }
            },
            quote! {
                pub async fn ping(&self) -> ::core::result::Result<(), ::clouds::Error> {
                    self.inner.call_value::<_, ()>("test.ping", &()).await
                }
            },
            quote! {
                pub async fn one(&self, x: Vec<u8>) -> ::core::result::Result<io::Result<u8>, ::clouds::Error> {
                    self.inner.call_value::<_, io::Result<u8> >("test.one", &(x,)).await
                }
            },
        ];
        for expected in expected {
            let expected = expected.to_string();
            assert!(client.contains(&expected), "{client}\nlacks\n{expected}");
        }
        assert!(client.contains("# [doc = r\" Greets someone.\"] pub async fn hello"));
        assert!(client.contains(
            "# [doc = \"Calls [`Hello::div`] on a provider of the `test` service.\"] pub async fn div"
        ));
    }

    #[test]
    fn server_routes_call_through_the_trait() {
        let file = expand(quote!("test"), hello());
        let service = text(&file.items[6]);
        for expected in [
            r#"value_route ("test.hello" , move | (name , msg ,) : (String , :: std :: string :: String ,) |"#,
            "Hello :: hello (& * __clouds_inner , name , msg) . await",
            r#"result_route ("test.div" , move | (a , b ,) : (i64 , i64 ,) |"#,
            r#"value_route ("test.ping" , move | () : () |"#,
            r#"value_route ("test.one" , move | (x ,) : (Vec < u8 > ,) |"#,
            "where T : Hello + :: core :: marker :: Send + :: core :: marker :: Sync + 'static",
        ] {
            assert!(service.contains(expected), "{service}\nlacks\n{expected}");
        }
        assert_eq!(service.matches("__clouds_routes . push (").count(), 5);
    }

    #[test]
    fn empty_service_has_no_routes() {
        let file = expand(
            quote!("empty"),
            quote!(
                trait Empty {}
            ),
        );
        let service = text(&file.items[6]);
        assert!(
            service.contains("{ :: std :: vec :: Vec :: new () }"),
            "{service}"
        );
    }

    #[test]
    fn keeps_visibility_and_cfg() {
        let file = expand(
            quote!("v"),
            quote! {
                #[cfg(feature = "x")]
                pub(crate) trait V {
                    #[cfg(feature = "y")]
                    async fn m(&self);
                }
            },
        );
        let client = text(&file.items[1]);
        assert!(client.contains("pub (crate) struct VClient"), "{client}");
        assert!(text(&file.items[2]).contains("pub (crate) fn new"));
        for item in &file.items {
            assert!(text(item).starts_with("# [cfg (feature = \"x\")]"));
        }
        let service = text(&file.items[6]);
        assert!(
            service.contains("# [cfg (feature = \"y\")] __clouds_routes . push"),
            "{service}"
        );
    }

    #[test]
    fn private_trait_gives_private_items() {
        let file = expand(
            quote!("p"),
            quote!(
                trait P {
                    async fn m(&self);
                }
            ),
        );
        assert!(text(&file.items[1]).contains("struct PClient"));
        assert!(!text(&file.items[1]).contains("pub"));
        assert!(text(&file.items[2]).contains("fn new"));
        assert!(!text(&file.items[2]).contains("pub"));
    }

    #[test]
    fn type_parameter_avoids_user_t() {
        let file = expand(
            quote!("t"),
            quote!(
                trait Uses {
                    async fn m(&self, t: T);
                }
            ),
        );
        assert!(text(&file.items[3]).contains("struct UsesServer < __CloudsImpl >"));
    }

    #[test]
    fn rejects_non_traits() {
        let errors = messages(
            service(
                quote!("x"),
                quote!(
                    struct S;
                ),
            )
            .map(drop),
        );
        assert_eq!(
            errors,
            ["`#[clouds::service]` can only be applied to a trait"]
        );
    }

    #[test]
    fn collects_attribute_and_trait_errors() {
        let errors = messages(
            service(
                quote!(x.y),
                quote!(
                    trait X {
                        fn a(&self);
                        async fn b(&mut self);
                    }
                ),
            )
            .map(drop),
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains("expected the service name as one string literal"));
        assert!(errors[1].contains("`async fn`"));
        assert!(errors[2].contains("`&mut self`"));
    }
}
