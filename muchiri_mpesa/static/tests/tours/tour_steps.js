/** @odoo-module **/

// The steps the M-Pesa portal tours share: log in as the portal user "distributor", open the
// quotation, open its payment form with M-Pesa chosen, and pay from a phone.

// The order's page is done loading once its chatter shows (its lazy bundles come last).  Odoo's
// test server answers one request at a time: a click before would wait seconds for those bundles,
// and a tour that ends before leaves a fetch the closing browser reports as an error.  With
// website installed they are first built for the website, which may take longer than a step's
// default 10 s.
export function pageLoaded(content) {
    return {
        content,
        trigger: "#chatterRoot:shadow .o-mail-Thread",
        timeout: 30000,
    };
}

// The quotation's payment form, M-Pesa chosen (again after an instalment: the page offers the rest).
export function openPaymentForm() {
    return [
        pageLoaded("The quotation is fully loaded, its chatter included"),
        {
            content: "Accept and pay the quotation",
            trigger: "#o_sale_portal_paynow",
            run: "click",
        },
        {
            content: "Choose M-Pesa",
            trigger: "#modalaccept input[name='o_payment_radio'][data-provider-code='mpesa']",
            run: "click",
        },
    ];
}

export function loginAndOpenQuotation() {
    return [
        {
            content: "Enter the distributor's login",
            trigger: ".oe_login_form input[name='login']",
            run: "edit distributor",
        },
        {
            content: "Enter the distributor's password",
            trigger: ".oe_login_form input[name='password']",
            run: "edit distributor",
        },
        {
            content: "Log in",
            trigger: ".oe_login_form button[type='submit']",
            run: "click",
        },
        {
            content: "Open the quotations from the portal home",
            trigger: "a[href='/my/quotes']",
            run: "click",
        },
        {
            content: "Open the quotation",
            trigger: ".o_portal_my_doc_table a[href^='/my/orders/']",
            run: "click",
        },
        ...openPaymentForm(),
        {
            content: "The phone number is filled in with the distributor's mobile",
            trigger: "#modalaccept #o_mpesa_phone:value(0708 374 149)",
        },
    ];
}

// Pay from the phone `phone`: Odoo's status page then waits for the prompt's answer.
export function payWith(phone) {
    return [
        {
            content: `Enter the M-Pesa phone number ${phone}`,
            trigger: "#modalaccept #o_mpesa_phone",
            run: `edit ${phone}`,
        },
        {
            content: "Pay",
            trigger: "#modalaccept button[name='o_payment_submit_button']:enabled",
            run: "click",
        },
        {
            content: "The status page tells to complete the payment on the phone",
            trigger:
                "div[name='o_payment_status'] div[name='o_payment_status_alert']" +
                ":contains(We sent an M-Pesa prompt to your phone)",
        },
    ];
}
